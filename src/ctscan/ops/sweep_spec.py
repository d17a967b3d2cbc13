"""What a sweep is, checked before anything runs: its spec (TOML) and base settings, --set.

A spec names the settings to search (`[params]`), the validation metric and its direction,
base settings files and fixed values (docs/sweep.md shows one). `prepare` reads it, resolves
the base settings and checks every value a trial may draw; `Sweep.trial_settings` gives a
trial's settings as `ctscan train -s BASE --set FIXED --set PARAMS` would, and `write_recipe`
the best trial's as a settings file. Running the study: ops/sweep.py.
"""

from __future__ import annotations

import itertools
import math
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from ctscan.errors import CtscanError, SettingsError, close_matches
from ctscan.files import atomic_write, ensure_dir
from ctscan.settings import (
    RECIPE_DIR,
    Settings,
    TrainSettings,
    deep_merge,
    load_settings,
    parse_overrides,
    read_settings_file,
    resolve_settings_file,
    toml_value,
)

METRICS: tuple[str, ...] = get_args(TrainSettings.model_fields["select_metric"].annotation)
SAMPLERS = ("tpe", "random")
DIRECTIONS = ("maximize", "minimize")
SEARCHABLE_SECTIONS = ("model", "augment", "train")
# Set by the sweep for every trial: the spec may not set them (the recipe gets select_metric).
FORCED_KEYS = ("train.evaluate_test", "train.select_metric", "tracking.log_model")
SWEEP_KEYS = {
    "metric": str,
    "direction": str,
    "sampler": str,
    "seed": int,
    "trials": int,
    "settings": list,
    "pruning": bool,
    "pruning_startup_trials": int,
    "pruning_warmup_epochs": int,
    "tpe_startup_trials": int,
    "heartbeat_interval": int,
    "grace_period": int,
}
POSITIVE_KEYS = ("trials", "heartbeat_interval", "grace_period")
TABLES = ("sweep", "fixed", "params")
RANGE_KEYS = ("low", "high", "log", "step")
PARAM_KEYS = (*RANGE_KEYS, "choices")
SPEC_DIR = RECIPE_DIR / "sweeps"  # sweep specs (not settings files: `-s` cannot load them)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SPEC_FIX = "see docs/sweep.md for the spec format."
STORAGE_FORMS = "sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DATABASE"
# ---- the spec ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (optionally log or stepped) or choices."""

    key: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    integer: bool = False
    choices: tuple[Any, ...] | None = None

    def suggest(self, trial: Any) -> Any:
        """This parameter's value for an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            step = int(self.step or 1)
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), step=step, log=self.log
            )
        return trial.suggest_float(
            self.key, float(self.low), float(self.high), step=self.step, log=self.log
        )

    def drawn_extremes(self) -> tuple[Any, ...]:
        """Every choice, or the lowest and highest value a trial can draw (a stepped range's
        top is the last step at or below `high`, as Optuna draws it)."""
        if self.choices is not None:
            return self.choices
        if self.step is None:
            return (self.low, self.high)
        steps = math.floor((self.high - self.low) / self.step + 1e-9)
        top = self.low + steps * self.step
        return (self.low, int(top) if self.integer else round(top, 12))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: what the study records of this parameter."""
        if self.choices is not None:
            return {"choices": list(self.choices)}
        out = {"low": self.low, "high": self.high, "log": self.log, "int": self.integer}
        return out | ({"step": self.step} if self.step is not None else {})

    def describe(self) -> str:
        """`float [0.0001, 0.01] log`, `int [16, 64] step 16`, `one of 16, 32`."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        kind = "int" if self.integer else "float"
        text = f"{kind} [{self.low}, {self.high}]"
        return text + (" log" if self.log else "") + (f" step {self.step}" if self.step else "")


@dataclass(frozen=True)
class SweepSpec:
    """A parsed sweep spec (see the module docstring and docs/sweep.md)."""

    path: Path
    metric: str
    direction: str
    params: tuple[Param, ...]
    fixed: dict[str, Any] = field(default_factory=dict)  # dotted key -> value
    settings_files: tuple[str, ...] = ()
    sampler: str = "tpe"
    seed: int = 0
    trials: int | None = None
    pruning: bool = True
    pruning_startup_trials: int = 5
    pruning_warmup_epochs: int = 0
    tpe_startup_trials: int = 10
    heartbeat_interval: int = 60  # seconds between a running trial's heartbeats
    grace_period: int = 120  # seconds without one before another process retries the trial

    def search_identity(self) -> dict[str, Any]:
        """What decides the trials (not where the spec lies nor how many trials): JSON-ready."""
        return {
            "metric": self.metric,
            "direction": self.direction,
            "sampler": self.sampler,
            "seed": self.seed,
            "pruning": self.pruning,
            "pruning_startup_trials": self.pruning_startup_trials,
            "pruning_warmup_epochs": self.pruning_warmup_epochs,
            "tpe_startup_trials": self.tpe_startup_trials,
            "fixed": dict(self.fixed),
            "params": {p.key: p.to_dict() for p in self.params},
        }


ALL_KEYS = [
    f"{section}.{key}"
    for section, info in Settings.model_fields.items()
    for key in info.annotation.model_fields
]


def _spec_error(path: Path, message: str, fix: str = SPEC_FIX) -> SettingsError:
    return SettingsError(f"sweep spec '{path}': {message}", fix)


def _check_keys(path: Path, table: str, found: dict[str, Any], allowed: Any) -> None:
    for key in found:
        if key not in allowed:
            hint = close_matches(key, list(allowed))
            raise _spec_error(
                path,
                f"unknown key '{key}' in [{table}].{hint}",
                f"the keys of [{table}] are: {', '.join(allowed)}.",
            )


def _settings_field(path: Path, table: str, key: str) -> Any:
    """The pydantic field a dotted settings key names; one clear error if there is none."""
    section, _, name = key.partition(".")
    info = Settings.model_fields.get(section)
    fields = info.annotation.model_fields if info is not None else {}
    if name not in fields or "." in name:
        raise _spec_error(
            path,
            f"unknown settings key '{key}' in [{table}].{close_matches(key, ALL_KEYS)}",
            "name a key as `ctscan settings show` lists it: section.key (e.g. train.lr).",
        )
    if key in FORCED_KEYS:
        raise _spec_error(
            path,
            f"[{table}] sets '{key}', which the sweep sets for every trial "
            "(train.evaluate_test and tracking.log_model off, train.select_metric = the metric).",
            f"remove '{key}' from [{table}].",
        )
    return fields[name]


def _flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"train": {"lr": 1}}` and `{"train.lr": 1}` -> `{"train.lr": 1}`."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def _param_tables(path: Path, table: dict[str, Any], prefix: str = "") -> dict[str, dict]:
    """[params] as `dotted key -> {low, high, ...}`: a table holding a non-table is a parameter."""
    out: dict[str, dict] = {}
    for key, value in table.items():
        dotted = f"{prefix}{key}"
        if not isinstance(value, dict):
            raise _spec_error(
                path,
                f"[params] {dotted} = {value!r} is not a table.",
                f'write [params."{dotted}"] with low = ..., high = ... (and log = true) or '
                "choices = [...].",
            )
        if not value or any(not isinstance(v, dict) for v in value.values()):
            out[dotted] = value
        else:
            out.update(_param_tables(path, value, dotted + "."))
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_param(path: Path, key: str, table: dict[str, Any]) -> Param:
    """One [params] entry, checked against the type of the setting it names."""
    where = f"[params] {key}"
    _check_keys(path, f"params.{key}", table, PARAM_KEYS)
    info = _settings_field(path, "params", key)
    if key.partition(".")[0] not in SEARCHABLE_SECTIONS:
        raise _spec_error(
            path,
            f"{where}: a sweep searches training settings ({', '.join(SEARCHABLE_SECTIONS)} "
            f"sections); '{key}' is fixed for a whole sweep.",
            f"move '{key}' to [fixed] or to a base settings file.",
        )
    if "choices" in table:
        extra = [k for k in RANGE_KEYS if k in table]
        choices = table["choices"]
        if extra:
            raise _spec_error(path, f"{where} has both choices and {', '.join(extra)}.")
        if not isinstance(choices, list) or not choices:
            raise _spec_error(path, f"{where}: choices must be a non-empty list, not {choices!r}.")
        if any(isinstance(c, (dict, list)) for c in choices) or len(set(map(repr, choices))) < len(
            choices
        ):
            raise _spec_error(
                path, f"{where}: choices must be distinct numbers, strings or booleans."
            )
        return Param(key=key, choices=tuple(choices))
    if "low" not in table or "high" not in table:
        raise _spec_error(path, f"{where} needs low and high (a range) or choices.")
    low, high, log, step = table["low"], table["high"], table.get("log", False), table.get("step")
    integer = info.annotation is int
    if info.annotation not in (int, float):
        raise _spec_error(
            path,
            f"{where}: '{key}' is not a number setting, so it has no range.",
            f"give choices = [...] for {key}.",
        )
    bounds = (low, high) + ((step,) if step is not None else ())
    if not all(_number(v) and (isinstance(v, int) or not integer) for v in bounds):
        kind = "integers" if integer else "numbers"
        raise _spec_error(path, f"{where}: low, high and step must be {kind}, not {bounds}.")
    if not isinstance(log, bool):
        raise _spec_error(path, f"{where}: log must be true or false, not {log!r}.")
    if not math.isfinite(low) or not math.isfinite(high) or low >= high:
        raise _spec_error(
            path, f"{where}: low {low} must be below high {high}.", "swap or correct them."
        )
    if log and low <= 0:
        raise _spec_error(
            path,
            f"{where}: a log range needs low > 0, not {low}.",
            "give a positive low, or drop log = true.",
        )
    if step is not None and (step <= 0 or log):
        raise _spec_error(path, f"{where}: step must be > 0 and cannot go with log = true.")
    return Param(
        key=key,
        low=int(low) if integer else float(low),
        high=int(high) if integer else float(high),
        log=log,
        step=step,
        integer=integer,
    )


def _sweep_value(path: Path, table: dict[str, Any], key: str, default: Any) -> Any:
    value = table.get(key, default)
    kind = SWEEP_KEYS[key]
    if key == "settings" and isinstance(value, str):
        value = [value]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if key == "settings":
        ok = ok and all(isinstance(v, str) for v in value)
    if not ok:
        raise _spec_error(path, f"[sweep] {key} = {value!r} is not a {kind.__name__}.")
    if kind is int and key != "seed" and value < (1 if key in POSITIVE_KEYS else 0):
        raise _spec_error(path, f"[sweep] {key} = {value} is too small.")
    return value


def parse_spec(data: dict[str, Any], path: Path) -> SweepSpec:
    """Check a spec's TOML data and return it parsed: every mistake is one SettingsError."""
    _check_keys(path, "top level", data, TABLES)
    for table in TABLES:
        if not isinstance(data.get(table, {}), dict):
            raise _spec_error(path, f"'{table}' must be a table ([{table}]).")
    sweep = data.get("sweep", {})
    _check_keys(path, "sweep", sweep, SWEEP_KEYS)
    metric = sweep.get("metric")
    if metric not in METRICS:
        got = "no metric" if metric is None else f"metric {metric!r}"
        hint = close_matches(str(metric), METRICS) if metric is not None else ""
        raise _spec_error(
            path,
            f"[sweep] has {got}.{hint}",
            f"set metric to a validation metric the loop records: {', '.join(METRICS)}.",
        )
    natural = "minimize" if metric == "val_loss" else "maximize"
    direction = _sweep_value(path, sweep, "direction", natural)
    if direction not in DIRECTIONS:
        raise _spec_error(
            path,
            f"[sweep] direction {direction!r} is not one of {', '.join(DIRECTIONS)}.",
        )
    if direction != natural:
        raise _spec_error(
            path,
            f"[sweep] direction '{direction}' for {metric} would search for the worst models.",
            f"write direction = '{natural}' (or leave it out).",
        )
    sampler = _sweep_value(path, sweep, "sampler", "tpe")
    if sampler not in SAMPLERS:
        raise _spec_error(
            path,
            f"[sweep] sampler {sampler!r} is not one of {', '.join(SAMPLERS)}."
            + close_matches(str(sampler), SAMPLERS),
        )
    raw_params = _param_tables(path, data.get("params", {}))
    if not raw_params:
        raise _spec_error(path, "it has no [params]: there is nothing to search.")
    params = tuple(_parse_param(path, key, table) for key, table in raw_params.items())
    fixed = _flatten(data.get("fixed", {}))
    for key in fixed:
        _settings_field(path, "fixed", key)
        if key in raw_params:
            raise _spec_error(path, f"'{key}' is both in [fixed] and in [params].")
    return SweepSpec(
        path=path,
        metric=metric,
        direction=direction,
        params=params,
        fixed=fixed,
        settings_files=tuple(_sweep_value(path, sweep, "settings", [])),
        sampler=sampler,
        seed=_sweep_value(path, sweep, "seed", 0),
        trials=_sweep_value(path, sweep, "trials", None) if "trials" in sweep else None,
        pruning=_sweep_value(path, sweep, "pruning", True),
        pruning_startup_trials=_sweep_value(path, sweep, "pruning_startup_trials", 5),
        pruning_warmup_epochs=_sweep_value(path, sweep, "pruning_warmup_epochs", 0),
        tpe_startup_trials=_sweep_value(path, sweep, "tpe_startup_trials", 10),
        heartbeat_interval=_sweep_value(path, sweep, "heartbeat_interval", 60),
        grace_period=_sweep_value(path, sweep, "grace_period", 120),
    )


def find_spec(name: str | Path) -> Path:
    """A spec file path, or a name looked up as settings/sweeps/<name>.toml."""
    path = Path(name)
    if path.is_file():
        return path
    named = SPEC_DIR / f"{name}.toml"
    if path.suffix == "" and named.is_file():
        return named
    what = "is a folder" if path.is_dir() else "does not exist"
    specs = sorted(p.stem for p in SPEC_DIR.glob("*.toml")) if SPEC_DIR.is_dir() else []
    hint = f" Specs in {SPEC_DIR}/: {', '.join(specs)}." if specs else ""
    raise SettingsError(
        f"sweep spec '{name}' {what}.{hint}",
        f"pass a sweep spec TOML file or its name in {SPEC_DIR}/ (e.g. cpu-smoke).",
    )


def load_spec(name: str | Path) -> SweepSpec:
    """Read and check a spec file."""
    path = find_spec(name)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise _spec_error(path, f"not valid TOML: {exc}.", "correct the TOML syntax.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise _spec_error(path, f"cannot be read: {exc}.", "pass a readable file.") from None
    return parse_spec(data, path)


# ---- the sweep: spec + base settings + where things live ------------------------------------


def _overrides(values: dict[str, Any]) -> list[str]:
    return [f"{key}={toml_value(value)}" for key, value in values.items()]


def nested(values: dict[str, Any]) -> dict[str, Any]:
    """`{"train.lr": 1}` -> `{"train": {"lr": 1}}`."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


def _hide_password(text: str) -> str:
    """`postgresql://user:secret@host` -> `postgresql://user:***@host` (messages, the command)."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


def _storage(storage: str | None, runs_dir: Path) -> tuple[str, Path | None]:
    """The Optuna storage URL and, for SQLite, its file; anything else is refused."""
    url = storage or f"sqlite:///{(runs_dir / 'optuna.db').resolve()}"
    scheme, sep, rest = url.partition("://")
    if sep and scheme == "sqlite" and len(rest) > 1 and rest.startswith("/"):
        return url, Path(rest[1:].split("?", 1)[0])
    if sep and scheme.split("+", 1)[0] == "postgresql" and rest:
        driver = "postgresql+psycopg" if scheme == "postgresql" else scheme  # not psycopg2
        return f"{driver}://{rest}", None
    raise SettingsError(
        f"--storage '{_hide_password(url)}' is neither a SQLite file nor a PostgreSQL database.",
        f"pass {STORAGE_FORMS} (several `ctscan sweep` processes, on many machines, share one).",
    )


@dataclass(frozen=True)
class Sweep:
    """A spec ready to run: base settings resolved, the study's name, size and places."""

    spec: SweepSpec
    name: str
    n_trials: int
    files: tuple[Path, ...]  # the base settings files, resolved
    base: dict[str, Any]  # their merged content
    given: dict[str, Any]  # --set: dotted key -> value, above the base files and [fixed]
    settings: Settings  # base + --set + fixed: what every trial starts from
    storage_url: str  # the Optuna storage
    db: Path | None  # its file when it is SQLite
    command: str  # the command that continues this sweep (a password hidden)

    @property
    def runs_dir(self) -> Path:
        return self.settings.paths.runs_dir

    @property
    def folder(self) -> Path:
        """The sweep folder: trial run folders, the recipe."""
        return self.runs_dir / "sweeps" / self.name

    @property
    def where(self) -> str:
        """The storage as messages show it: a SQLite file's path, a URL without its password."""
        return str(self.db) if self.db else _hide_password(self.storage_url)

    def identity(self) -> dict[str, Any]:
        """What the study records of its spec: a rerun must match it."""
        return {**self.spec.search_identity(), "base": self.base}

    def forced(self) -> dict[str, Any]:
        """What the sweep sets for every trial, above everything else."""
        return {
            "train.evaluate_test": False,  # the test split is never read during a sweep
            "tracking.log_model": False,  # trials do not enter the model registry
            "train.select_metric": self.spec.metric,
        }

    def trial_settings(self, values: dict[str, Any]) -> Settings:
        """A trial's settings: base files < env < --set < fixed < the trial's values < forced."""
        return _spec_settings(self.spec, self.files, self.given, values, self.forced())


def _base_files(spec: SweepSpec) -> tuple[Path, ...]:
    """[sweep] settings: paths next to the spec first, else as `-s` finds them."""
    found = []
    for name in spec.settings_files:
        beside = spec.path.parent / name
        try:
            path = beside if beside.is_file() else resolve_settings_file(name)
        except SettingsError as exc:
            raise _spec_error(spec.path, f"[sweep] settings: {exc.message}", exc.fix) from None
        if path.resolve() == spec.path.resolve():
            raise _spec_error(
                spec.path,
                f"[sweep] settings names the spec itself ('{name}').",
                "name a settings file (a recipe name such as cpu-smoke, or a path).",
            )
        found.append(path)
    return tuple(found)


def _check_overrides(spec: SweepSpec, files: tuple[Path, ...], overrides: list[str]) -> dict:
    """--set checked as `ctscan train` checks it; a key the sweep draws or sets is refused."""
    load_settings(list(files), overrides)
    given = _flatten(parse_overrides(overrides))
    for key in given:
        searched = key in {p.key for p in spec.params}
        if searched or key in FORCED_KEYS:
            raise SettingsError(
                f"--set {key}: the sweep {'searches' if searched else 'sets'} it for every "
                "trial, so the value would reach none.",
                f"drop --set {key} (docs/sweep.md says what a sweep sets).",
            )
    return given


def prepare(
    spec_name: str | Path,
    *,
    trials: int | None = None,
    name: str | None = None,
    recipe: Path | None = None,
    storage: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> Sweep:
    """Read the spec, resolve and check the base settings and every value it may give a trial."""
    spec = load_spec(spec_name)
    study = name or spec.path.stem
    if not NAME_PATTERN.fullmatch(study):
        raise SettingsError(
            f"study name '{study}' is not a plain name (letters, digits, '.', '_', '-').",
            "pass --name with such a name.",
        )
    n_trials = trials or spec.trials
    if not n_trials:
        raise SettingsError(
            f"sweep spec '{spec.path}' sets no number of trials.",
            "pass --trials N, or set trials = N in [sweep].",
        )
    files = _base_files(spec)
    given = _check_overrides(spec, files, list(overrides))
    base: dict[str, Any] = {}
    for path in files:
        base = deep_merge(base, read_settings_file(path))
    settings = _spec_settings(spec, files, given, {})
    _check_drawable(spec, files, given)
    url, db = _storage(storage, settings.paths.runs_dir)
    command = ["ctscan", "sweep", str(spec_name), "--trials", str(n_trials)]
    command += ["--name", study] if name else []
    command += ["--recipe", str(recipe)] if recipe is not None else []
    command += ["--storage", storage] if storage else []
    command += [arg for item in overrides for arg in ("--set", item)]
    command_text = _hide_password(shlex.join(command))
    return Sweep(spec, study, n_trials, files, base, given, settings, url, db, command_text)


def _check_drawable(spec: SweepSpec, files: tuple[Path, ...], given: dict[str, Any]) -> None:
    """Refuse a bound or choice that no trial can use.

    First each value alone (the other keys at their base values): a value wrong by itself
    (`model.dropout` 1.5, `model.name` "nope") is named alone. A value refused only by a check
    across keys (augment.scale_min <= scale_max, model.frozen_stages vs the model's stages) is
    then tried with the values the spec draws for the swept keys that check names (their
    bounds, the checks being monotone, or each choice); it passes if one fits. A spec some of
    whose trials draw a refused combination still starts: those trials are pruned, with the
    reason.
    """
    extremes = {p.key: p.drawn_extremes() for p in spec.params}
    across: list[tuple[str, Any, SettingsError]] = []
    for key, values in extremes.items():
        for value in values:
            try:
                _spec_settings(spec, files, given, {key: value})
            except SettingsError as exc:
                if not exc.conflict_keys:
                    raise
                across.append((key, value, exc))
    for key, value, exc in across:
        partners = sorted(k for k in exc.conflict_keys & extremes.keys() if k != key)
        if not partners:  # it conflicts with values no trial changes
            raise exc
        errors: list[SettingsError] = []
        for combo in itertools.product(*(extremes[k] for k in partners)):
            drawn = {**dict(zip(partners, combo, strict=True)), key: value}
            try:
                _spec_settings(spec, files, given, drawn)
                break
            except SettingsError as failed:
                errors.append(failed)
        else:
            raise _spec_error(
                spec.path,
                f"no trial can use {key} = {value!r}: it fits none of the values the spec "
                f"draws for {', '.join(partners)}; e.g. "
                + errors[0].message.removeprefix(f"sweep spec '{spec.path}': "),
                errors[0].fix,
            )


def _spec_settings(
    spec: SweepSpec,
    files: tuple[Path, ...],
    given: dict[str, Any],
    values: dict[str, Any],
    forced: dict[str, Any] | None = None,
) -> Settings:
    """Base files < env < --set < [fixed] < `values` < `forced`; a refusal names the spec."""
    params = {param.key for param in spec.params}
    values = {**{k: v for k, v in spec.fixed.items() if k not in given}, **values}
    origins = {
        key: f'[params."{key}"] of the spec' if key in params else f'[fixed] "{key}" of the spec'
        for key in values
    } | {key: "`ctscan sweep` itself (every trial)" for key in forced or {}}
    overrides = _overrides({**given, **values, **(forced or {})})
    try:
        return load_settings(list(files), overrides, origins=origins)
    except SettingsError as exc:
        error = _spec_error(
            spec.path, exc.message, "correct the value where the message says it was set."
        )
        error.conflict_keys = exc.conflict_keys
        raise error from None


def recipe_text(sweep: Sweep, best: dict[str, Any]) -> str:
    """The best trial as a settings file: base files + --set + [fixed] + its parameters."""
    data = deep_merge(sweep.base, nested({**sweep.spec.fixed, **sweep.given}))
    data = deep_merge(data, nested(best["params"]))
    data = deep_merge(data, {"train": {"select_metric": sweep.spec.metric}})
    bases = ", ".join(str(p) for p in sweep.files) or "the defaults"
    lines = [
        f"# The best trial of the ctscan sweep '{sweep.name}' (spec {sweep.spec.path}): trial "
        f"{best['number']},",
        f"# {sweep.spec.metric} {best['value']:.6g} ({sweep.spec.direction}) after "
        f"{best['epochs']} epochs on the validation split.",
        f"# Base settings ({bases}), --set, the spec's [fixed] and the trial's parameters.",
        "# Train with: ctscan train -s THIS_FILE",
        "",
    ]
    order = list(Settings.model_fields)
    for section in sorted(data, key=lambda s: order.index(s) if s in order else len(order)):
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in data[section].items()]
        lines.append("")
    return "\n".join(lines)


def write_recipe(sweep: Sweep, best: dict[str, Any], path: Path) -> Path:
    """Write the recipe atomically and check that it loads as `ctscan train -s` loads it."""
    ensure_dir(path.parent, what="recipe folder", error=CtscanError)
    text = recipe_text(sweep, best).encode()
    atomic_write(path, lambda fh: fh.write(text))
    load_settings([path])
    return path

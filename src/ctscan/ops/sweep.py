"""`ctscan sweep`: an Optuna search over settings; each trial is one run of the training loop.

A spec (TOML) names the settings to search, the validation metric and its direction, base
settings files and fixed values (docs/sweep.md shows one). Each trial resolves its settings as
`ctscan train -s BASE --set FIXED --set PARAMS` would and runs `run_training` with a
`RunHooks.on_epoch` that reports the metric to Optuna each epoch and stops the run when the
median pruner says so. Trials never read the test split (`train.evaluate_test` is forced off)
and never touch the model registry (`tracking.log_model` is forced off).

Where things live (`runs_dir` is `paths.runs_dir` of the base settings):

    <runs_dir>/optuna.db                 the Optuna studies (SQLite), one per study name
    <runs_dir>/sweeps/<name>/            trial-0000/ ... (run folders), best.toml, worker-<i>.log
    MLflow                               a parent run `sweep-<name>`, one nested run per trial

An interrupted sweep resumes when rerun: `--trials N` counts the finished trials of the study
(complete, pruned, or failed because of their own settings); an interrupted trial starts again
with the same parameters. `--jobs J` runs J worker processes that share the study; one
`ctscan sweep` at a time per study (its folder is locked). optuna is imported only here.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from ctscan.errors import (
    CtscanError,
    Interrupted,
    SettingsError,
    Terminated,
    close_matches,
    held_signals,
    raise_terminated,
    report,
    say_line,
)
from ctscan.files import atomic_write, ensure_dir, folder_lock
from ctscan.settings import (
    RECIPE_DIR,
    Settings,
    TrainSettings,
    deep_merge,
    env_name,
    load_settings,
    public_dict,
    read_settings_file,
    resolve_settings_file,
    toml_value,
)

EXTRA_FIX = "pip install 'ctscan[sweep]'"
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
}
TABLES = ("sweep", "fixed", "params")
RANGE_KEYS = ("low", "high", "log", "step")
PARAM_KEYS = (*RANGE_KEYS, "choices")
SPEC_DIR = RECIPE_DIR / "sweeps"  # sweep specs (not settings files: `-s` cannot load them)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SPEC_FIX = "see docs/sweep.md for the spec format."
INTERRUPT_CODES = (130, 143)
WORKER_STOP_GRACE_S = 60.0
POLL_S = 0.5

# Optuna study and trial attributes, MLflow tags.
ATTR_SPEC = "ctscan.spec"
ATTR_SETTINGS = "ctscan.settings"  # the base settings every trial started from (public_dict)
ATTR_PARENT_RUN = "ctscan.parent_run_id"
ATTR_RUN_DIR = "run_dir"
ATTR_EPOCHS = "epochs"
ATTR_RUN_ID = "mlflow_run_id"
ATTR_FAIL_REASON = "fail_reason"  # failed because of its own settings: counts as finished
ATTR_ERROR = "error"  # failed on an error: started again on the next run
ATTR_INTERRUPTED = "interrupted"  # stopped by Ctrl-C or SIGTERM: started again on the next run
ATTR_RETRY_OF = "retry_of"
ATTR_WORKER = "worker"  # 0: the sweep's own process; 1..J: its worker processes
ATTR_STOP = "stop_reason"
TAG_SWEEP = "ctscan.sweep"
TAG_TRIAL = "ctscan.trial"


class SweepError(CtscanError):
    """A sweep cannot start or go on (the study, its folder, its workers)."""


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
    if kind is int and key != "seed" and value < (1 if key == "trials" else 0):
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


def _nest(values: dict[str, Any]) -> dict[str, Any]:
    """`{"train.lr": 1}` -> `{"train": {"lr": 1}}`."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        section, _, name = key.partition(".")
        out.setdefault(section, {})[name] = value
    return out


@dataclass(frozen=True)
class Sweep:
    """A spec ready to run: base settings resolved, the study's name, size and places."""

    spec: SweepSpec
    name: str
    n_trials: int
    jobs: int
    files: tuple[Path, ...]  # the base settings files, resolved
    base: dict[str, Any]  # their merged content
    settings: Settings  # base + fixed: what every trial starts from
    command: str  # the command that continues this sweep

    @property
    def runs_dir(self) -> Path:
        return self.settings.paths.runs_dir

    @property
    def db(self) -> Path:
        """The Optuna SQLite database, beside the default MLflow store."""
        return self.runs_dir / "optuna.db"

    @property
    def folder(self) -> Path:
        """The sweep folder: trial run folders, the recipe, worker logs."""
        return self.runs_dir / "sweeps" / self.name

    @property
    def storage_url(self) -> str:
        return f"sqlite:///{self.db.resolve()}"

    def identity(self) -> dict[str, Any]:
        """What the study records of its spec: a rerun must match it."""
        return {**self.spec.search_identity(), "base": self.base}

    def forced(self) -> dict[str, Any]:
        """What the sweep sets for every trial, above everything else."""
        out: dict[str, Any] = {
            "train.evaluate_test": False,  # the test split is never read during a sweep
            "tracking.log_model": False,  # trials do not enter the model registry
            "train.select_metric": self.spec.metric,
        }
        if self.jobs > 1:  # the cores shared by the workers; their logs in plain lines
            cores = self.settings.train.threads or os.cpu_count() or 1
            out["train.threads"] = max(1, cores // self.jobs)
            out["train.quiet"] = True
        return out

    def trial_settings(self, values: dict[str, Any]) -> Settings:
        """A trial's settings: base files < env < fixed < the trial's values < forced."""
        forced = self.forced()
        origins = _spec_origins(self.spec, {**self.spec.fixed, **values})
        origins |= {key: "`ctscan sweep` itself (every trial)" for key in forced}
        overrides = _overrides({**self.spec.fixed, **values, **forced})
        return load_settings(list(self.files), overrides, origins=origins)


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


def prepare(
    spec_name: str | Path,
    *,
    trials: int | None = None,
    jobs: int = 1,
    name: str | None = None,
    recipe: Path | None = None,
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
    if jobs < 1:
        raise SettingsError(f"--jobs {jobs}: at least 1 process runs the trials.", "--jobs 1")
    files = _base_files(spec)
    base: dict[str, Any] = {}
    for path in files:
        base = deep_merge(base, read_settings_file(path))
    settings = _spec_settings(spec, files, spec.fixed)
    _check_drawable(spec, files)
    command = ["ctscan", "sweep", str(spec_name), "--trials", str(n_trials)]
    command += ["--jobs", str(jobs)] if jobs > 1 else []
    command += ["--name", study] if name else []
    command += ["--recipe", str(recipe)] if recipe is not None else []
    return Sweep(
        spec=spec,
        name=study,
        n_trials=n_trials,
        jobs=jobs,
        files=files,
        base=base,
        settings=settings,
        command=shlex.join(command),
    )


def _check_drawable(spec: SweepSpec, files: tuple[Path, ...]) -> None:
    """Refuse a bound or choice that no trial can use.

    First each value alone (the other keys at their base values): a value wrong by itself
    (`model.dropout` 1.5, `model.name` "nope") is named alone. A value refused only by a check
    across keys (augment.scale_min <= scale_max, model.frozen_stages vs the model's stages) is
    then tried with the values the spec draws for the swept keys that check names (their
    bounds, the checks being monotone, or each choice); it passes if one fits. A spec some of
    whose trials draw a refused combination still starts: those trials fail, with the reason.
    """
    extremes = {p.key: p.drawn_extremes() for p in spec.params}
    across: list[tuple[str, Any, SettingsError]] = []
    for key, values in extremes.items():
        for value in values:
            try:
                _spec_settings(spec, files, {**spec.fixed, key: value})
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
            drawn = {**spec.fixed, **dict(zip(partners, combo, strict=True)), key: value}
            try:
                _spec_settings(spec, files, drawn)
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


def _spec_origins(spec: SweepSpec, values: dict[str, Any]) -> dict[str, str]:
    """Where in the spec each dotted key of `values` is set (for settings error messages)."""
    params = {param.key for param in spec.params}
    return {
        key: f'[params."{key}"] of the spec' if key in params else f'[fixed] "{key}" of the spec'
        for key in values
    }


def _spec_settings(spec: SweepSpec, files: tuple[Path, ...], values: dict[str, Any]) -> Settings:
    try:
        return load_settings(list(files), _overrides(values), origins=_spec_origins(spec, values))
    except SettingsError as exc:
        error = _spec_error(
            spec.path, exc.message, "correct the value where the message says it was set."
        )
        error.conflict_keys = exc.conflict_keys
        raise error from None


# ---- the study ----------------------------------------------------------------------------


def _import_optuna() -> Any:
    """optuna, quiet (our own lines say what each trial did); a missing extra is one line."""
    try:
        import optuna
    except ImportError as exc:
        raise SweepError(
            f"`ctscan sweep` needs optuna, which cannot be imported ({exc}).", EXTRA_FIX
        ) from None
    import warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive flock on `path`, waiting for it (no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sampler(optuna: Any, sweep: Sweep, salt: int) -> Any:
    """TPE (constant liar when trials run side by side) or random, seeded per process."""
    seed = sweep.spec.seed + salt
    if sweep.spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=sweep.spec.tpe_startup_trials, constant_liar=sweep.jobs > 1
    )


def _pruner(optuna: Any, spec: SweepSpec) -> Any:
    """The median rule on the per-epoch metric (steps are epochs, 1-based), or none."""
    if not spec.pruning:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=spec.pruning_startup_trials,
        n_warmup_steps=spec.pruning_warmup_epochs + 1,  # epochs 1..warmup are never pruned
    )


def _changes(before: Any, now: Any, prefix: str = "") -> list[str]:
    """`key: old -> new` for what differs between two JSON-ready trees."""
    if isinstance(before, dict) and isinstance(now, dict):
        out = []
        for key in sorted(set(before) | set(now), key=str):
            out += _changes(before.get(key), now.get(key), f"{prefix}{key}.")
        return out
    if before != now:
        return [f"{prefix.rstrip('.')}: {before!r} -> {now!r}"]
    return []


def open_study(optuna: Any, sweep: Sweep, *, create: bool, worker: int = 0) -> Any:
    """Create or load the study (under a lock on the database), refusing a changed spec.

    The sampler's seed is the spec's for a new study in one process; each worker, and each
    rerun of a study that has trials already, gets its own, so none replays another's draws.
    """
    ensure_dir(sweep.runs_dir, what="runs folder", error=SweepError)
    with _locked(sweep.db.with_name(sweep.db.name + ".lock")):
        if not create and not sweep.db.is_file():
            raise SweepError(f"no Optuna database at '{sweep.db}'.", f"run `{sweep.command}`.")
        if create and not sweep.db.is_file():
            _create_db(optuna, sweep.db)
        storage = optuna.storages.RDBStorage(
            sweep.storage_url,
            engine_kwargs={"connect_args": {"timeout": 60}},
            skip_table_creation=True,
        )
        study = optuna.create_study(
            study_name=sweep.name,
            storage=storage,
            direction=sweep.spec.direction,
            sampler=_sampler(optuna, sweep, 0),
            pruner=_pruner(optuna, sweep.spec),
            load_if_exists=True,
        )
        if worker or study.trials:
            study.sampler = _sampler(optuna, sweep, 1000 * worker + len(study.trials))
        identity = json.loads(json.dumps(sweep.identity()))
        recorded = study.user_attrs.get(ATTR_SPEC)
        if recorded is None and not study.trials and create:
            _refuse_stale_folder(sweep)
            study.set_user_attr(ATTR_SPEC, identity)
            study.set_user_attr(ATTR_SETTINGS, json.loads(json.dumps(public_dict(sweep.settings))))
        elif recorded is None:
            raise SweepError(
                f"study '{sweep.name}' in '{sweep.db}' was not made by `ctscan sweep`.",
                "pass another --name.",
            )
        elif recorded != identity:
            changed = _changes(recorded, identity)
            raise SweepError(
                f"study '{sweep.name}' in '{sweep.db}' was made from another spec "
                f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}).",
                f"rerun with the spec (and base settings) it was made from, or start a new study: "
                f"--name {sweep.name}-2 (or delete this one: optuna delete-study --storage "
                f"{sweep.storage_url} --study-name {sweep.name}).",
            )
        else:
            _refuse_changed_settings(sweep, study)
    return study


def _trials_settings(study: Any) -> dict[str, Any] | None:
    """The settings the study's trials started from: recorded at creation, or (a study made
    before ctscan recorded them) the settings.toml of its first trial's run folder."""
    recorded = study.user_attrs.get(ATTR_SETTINGS)
    if recorded is not None:
        return recorded
    for trial in study.trials:
        path = Path(trial.user_attrs.get(ATTR_RUN_DIR) or "") / "settings.toml"
        if path.is_file():
            try:
                return read_settings_file(path)
            except SettingsError:
                return None
    return None


def _refuse_changed_settings(sweep: Sweep, study: Any) -> None:
    """Refuse to add trials that would train otherwise than the study's earlier ones.

    The spec and base files are the study's identity; what else decides a trial (ctscan's
    defaults, a setting ctscan added since, CTSCAN_* variables) is compared here, as a resumed
    run compares its settings: where the run takes place may change, the swept keys and what
    the sweep sets for every trial are the trial's own.
    """
    from ctscan.engine.train import RUN_PLACE_KEYS, refused_settings

    before = _trials_settings(study)
    if before is None:
        return
    own = (*(p.key for p in sweep.spec.params), *sweep.forced())
    refused = refused_settings(before, sweep.settings, may_change=own, allowed=RUN_PLACE_KEYS)
    if not refused:
        return
    env = " ".join(
        shlex.quote(f"{env_name(key)}={old if isinstance(old, str) else toml_value(old)}")
        for key, old, _ in refused
    )
    changes = "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in refused)
    raise SweepError(
        f"study '{sweep.name}' in '{sweep.db}': its trials ran with other settings than a new "
        f"trial would get ({changes}), from ctscan's defaults or CTSCAN_* variables.",
        f"continue with those values in the environment ({env} before the command), or start "
        f"a new study: --name {sweep.name}-2.",
    )


def _create_db(optuna: Any, db: Path) -> None:
    """Make a new Optuna database beside `db` and rename it into place.

    Optuna creates its tables and then stamps the schema version in separate steps; a process
    that opens the file in between (a worker, optuna-dashboard, `optuna.load_study`) would try
    to stamp it too and fail on the version row. Renamed into place, `db` is never half made.
    """
    temp = db.with_name(f".{db.name}.{os.getpid()}.creating")
    temp.unlink(missing_ok=True)
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{temp.resolve()}")
        storage.engine.dispose()
        os.replace(temp, db)
    finally:
        temp.unlink(missing_ok=True)


def _refuse_stale_folder(sweep: Sweep) -> None:
    """A new study never writes into trial folders an older study of that name left."""
    if sweep.folder.is_dir() and any(sweep.folder.glob("trial-*")):
        raise SweepError(
            f"the sweep folder '{sweep.folder}' holds trials of an earlier study named "
            f"'{sweep.name}' that '{sweep.db}' no longer has.",
            "move that folder aside, or pass another --name.",
        )


def _state(optuna: Any, name: str) -> Any:
    return getattr(optuna.trial.TrialState, name)


def _counts(trial: Any) -> bool:
    """Whether a trial is finished for `--trials N`: its result stands."""
    state = trial.state.name
    return state in ("COMPLETE", "PRUNED") or (
        state == "FAIL" and ATTR_FAIL_REASON in trial.user_attrs
    )


def finished(study: Any) -> int:
    """How many trials of the study count toward `--trials N`."""
    return sum(_counts(t) for t in study.get_trials(deepcopy=False))


def requeue_unfinished(optuna: Any, study: Any, room: int) -> tuple[list[int], list[int]]:
    """Start again, with the same parameters, up to `room` trials an earlier run left unfinished.

    Returns (the trials queued again, the unfinished ones not queued because `room` trials are
    already queued or the study needs no more). Only one `ctscan sweep` runs a study at a time (its
    folder lock), so a trial still marked running belongs to a process that died; it is marked
    failed first. A trial not queued now is queued by a later run that needs it (a larger --trials).
    """
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(ATTR_RETRY_OF) for t in trials}
    unfinished = []
    for trial in trials:
        if trial.state.name == "RUNNING":
            study.tell(trial.number, state=_state(optuna, "FAIL"))
        elif trial.state.name != "FAIL" or ATTR_FAIL_REASON in trial.user_attrs:
            continue
        if trial.number not in retried and trial.params:
            unfinished.append(trial)
    waiting = [t for t in trials if t.state.name == "WAITING"]
    again = unfinished[: max(0, room - len(waiting))]
    for trial in again:
        study.enqueue_trial(trial.params, user_attrs={ATTR_RETRY_OF: trial.number})
    # Retries an earlier run queued beyond what this one needs stay queued (Optuna cannot take
    # a trial back) until a run with a larger --trials asks for them: they are left too.
    surplus = [t.user_attrs.get(ATTR_RETRY_OF, t.number) for t in waiting[room:]]
    return [t.number for t in again], [t.number for t in unfinished[len(again) :]] + surplus


# ---- one trial ----------------------------------------------------------------------------


class _Pruning:
    """`RunHooks.on_epoch` of a trial: report the metric to Optuna, stop when it says prune."""

    def __init__(self, trial: Any, metric: str, epochs: int) -> None:
        self.trial, self.metric, self.epochs = trial, metric, epochs
        self.pruned = False

    def __call__(self, row: dict[str, Any]) -> str | None:
        epoch, value = int(row["epoch"]), float(row[self.metric])
        self.trial.report(value, step=epoch)
        # Pruning after the last epoch would save nothing: a finished trial tells TPE more.
        if epoch < self.epochs and self.trial.should_prune():
            self.pruned = True
            return (
                f"pruned: {self.metric} {value:.4f} at epoch {epoch} is worse than the median "
                "of the earlier trials at that epoch"
            )
        return None


def _best_value(history: list[dict[str, Any]], metric: str, direction: str) -> float:
    values = [float(row[metric]) for row in history if not math.isnan(float(row[metric]))]
    if not values:
        return math.nan
    return max(values) if direction == "maximize" else min(values)


def run_trial(
    optuna: Any,
    sweep: Sweep,
    study: Any,
    trial: Any,
    parent_run_id: str | None,
    worker: int = 0,
) -> Any:
    """Train one trial with the loop and tell Optuna how it went; returns the frozen trial.

    A Ctrl-C or SIGTERM during training ends the trial as interrupted (it runs again on the
    next sweep); one during the bookkeeping before or after waits for it, so a trial is never
    left running with its result half recorded.
    """
    from ctscan.engine.tracking import TAG_PARENT_RUN_ID
    from ctscan.engine.train import RunHooks, run_training

    stops = (signal.SIGINT, signal.SIGTERM)
    told = None
    try:
        with held_signals(*stops):
            values = {param.key: param.suggest(trial) for param in sweep.spec.params}
            run_dir = sweep.folder / f"trial-{trial.number:04d}"
            trial.set_user_attr(ATTR_RUN_DIR, str(run_dir))
            trial.set_user_attr(ATTR_WORKER, worker)
            try:
                settings = sweep.trial_settings(values)
            except SettingsError as exc:  # e.g. augment.scale_min above the scale_max drawn
                trial.set_user_attr(ATTR_FAIL_REASON, exc.message)
                told = study.tell(trial, state=_state(optuna, "FAIL"))
        if told is not None:
            return told
        pruning = _Pruning(trial, sweep.spec.metric, settings.train.epochs)
        tags = {TAG_SWEEP: sweep.name, TAG_TRIAL: str(trial.number)}
        if parent_run_id:
            tags[TAG_PARENT_RUN_ID] = parent_run_id
        result = run_training(settings, out_dir=run_dir, hooks=RunHooks(tags, pruning))
        with held_signals(*stops):  # trained: the result is recorded before a stop acts
            told = _tell_result(optuna, sweep, study, trial, result, pruning)
        return told
    except BaseException as exc:
        if told is None:
            with held_signals(*stops):  # a second Ctrl-C waits for the failure to be recorded
                if isinstance(exc, (KeyboardInterrupt, Interrupted)):
                    trial.set_user_attr(ATTR_INTERRUPTED, True)
                else:
                    error = str(exc).splitlines()[0][:500] if str(exc) else ""
                    trial.set_user_attr(ATTR_ERROR, error)
                study.tell(trial, state=_state(optuna, "FAIL"))
        if isinstance(exc, Interrupted):  # the loop's own message names `ctscan train`: ours
            raise (Terminated() if exc.terminated else KeyboardInterrupt()) from None
        raise


def _tell_result(
    optuna: Any, sweep: Sweep, study: Any, trial: Any, result: Any, pruning: _Pruning
) -> Any:
    assert result is not None  # one process: rank 0
    trial.set_user_attr(ATTR_EPOCHS, len(result.history))
    if result.run_id:
        trial.set_user_attr(ATTR_RUN_ID, result.run_id)
    if pruning.pruned:
        trial.set_user_attr(ATTR_STOP, f"pruned at epoch {len(result.history)}")
        return study.tell(trial, state=_state(optuna, "PRUNED"))
    value = _best_value(result.history, sweep.spec.metric, sweep.spec.direction)
    if math.isnan(value):
        trial.set_user_attr(ATTR_FAIL_REASON, f"{sweep.spec.metric} was NaN at every epoch")
        return study.tell(trial, state=_state(optuna, "FAIL"))
    return study.tell(trial, value)


def _next_trial(sweep: Sweep, study: Any) -> Any:
    """A new trial, or None once finished + running trials reach N (atomic across workers)."""
    with _locked(sweep.folder / ".ask.lock"):
        trials = study.get_trials(deepcopy=False)
        taken = sum(_counts(t) or t.state.name == "RUNNING" for t in trials)
        return study.ask() if taken < sweep.n_trials else None


def work(
    optuna: Any,
    sweep: Sweep,
    study: Any,
    parent_run_id: str | None,
    announce: Callable[[Any], None],
    *,
    worker: int = 0,
    parent_pid: int | None = None,
) -> None:
    """Run trials until the study holds N finished ones (or the process that started us died)."""
    while (trial := _next_trial(sweep, study)) is not None:
        announce(run_trial(optuna, sweep, study, trial, parent_run_id, worker))
        if parent_pid is not None and os.getppid() != parent_pid:
            return


# ---- workers: one process per job ----------------------------------------------------------


def _worker_command(sweep: Sweep, index: int) -> list[str]:
    config = {
        "spec": str(sweep.spec.path),
        "name": sweep.name,
        "trials": sweep.n_trials,
        "jobs": sweep.jobs,
        "worker": index + 1,
        "ppid": os.getpid(),
    }
    return [sys.executable, "-m", "ctscan.ops.sweep", json.dumps(config)]


def worker_main(argv: list[str]) -> int:
    """A worker process (`python -m ctscan.ops.sweep CONFIG`): trials until N, then exit."""
    signal.signal(signal.SIGTERM, raise_terminated)
    config = json.loads(argv[0])
    try:
        optuna = _import_optuna()
        sweep = prepare(
            config["spec"], trials=config["trials"], jobs=config["jobs"], name=config["name"]
        )
        worker = config["worker"]
        study = open_study(optuna, sweep, create=False, worker=worker)
        parent = study.user_attrs.get(ATTR_PARENT_RUN)
        work(optuna, sweep, study, parent, lambda t: None, worker=worker, parent_pid=config["ppid"])
    except CtscanError as error:
        return report(error)
    except KeyboardInterrupt as exc:
        return 143 if isinstance(exc, Terminated) else 130
    return 0


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    marked = [line for line in lines if line.startswith("ctscan: ")]
    return (marked or lines or [""])[-1].strip()


def _stop_workers(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each worker (it ends its trial as interrupted), then wait; kill the late ones."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + WORKER_STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            proc.kill()
            proc.wait()


def run_workers(sweep: Sweep, study: Any, announce: Callable[[Any], None]) -> None:
    """J worker processes share the study; this one says what each finished trial did."""
    seen = {t.number for t in study.get_trials(deepcopy=False) if t.state.is_finished()}
    logs = [sweep.folder / f"worker-{i + 1}.log" for i in range(sweep.jobs)]
    procs: list[subprocess.Popen] = []

    def tell_new() -> None:
        for trial in study.get_trials(deepcopy=False):
            if trial.state.is_finished() and trial.number not in seen:
                seen.add(trial.number)
                announce(trial)

    try:
        for index, log in enumerate(logs):
            with log.open("ab") as out:  # own session: Ctrl-C reaches this process only
                procs.append(
                    subprocess.Popen(
                        _worker_command(sweep, index),
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        while any(proc.poll() is None for proc in procs):
            tell_new()
            if any(proc.poll() not in (None, 0, *INTERRUPT_CODES) for proc in procs):
                _stop_workers(procs)  # one failed: the others stop too (their trials rerun)
                break
            time.sleep(POLL_S)
        tell_new()
    except KeyboardInterrupt:
        _stop_workers(procs)
        raise
    codes = [proc.returncode for proc in procs]
    for index, code in enumerate(codes):
        if code not in (0, *INTERRUPT_CODES):
            raise SweepError(
                f"sweep worker {index + 1} failed (exit {code}): "
                f"{_last_line(logs[index]) or 'no message'}",
                f"see {logs[index]}; finished trials are kept: fix the cause and rerun "
                f"`{sweep.command}`.",
            )
    if any(code in INTERRUPT_CODES for code in codes):  # a worker was stopped by a signal
        raise Terminated() if 143 in codes else KeyboardInterrupt()


# ---- the whole sweep ----------------------------------------------------------------------


def _trial_row(trial: Any) -> dict[str, Any]:
    """One trial for the table and the JSON: number, state, params, value, epochs, seconds."""
    state = trial.state.name
    seconds = None
    if trial.datetime_start is not None and trial.datetime_complete is not None:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    attrs = trial.user_attrs
    note = ""
    if state == "FAIL":
        if not trial.params and ATTR_FAIL_REASON not in attrs:  # stopped before any was drawn
            note = "stopped before its parameters were drawn: nothing to run again"
        elif attrs.get(ATTR_INTERRUPTED):
            note = "interrupted: run again"
        elif ATTR_FAIL_REASON in attrs:
            note = str(attrs[ATTR_FAIL_REASON])
        else:
            note = f"error: {attrs.get(ATTR_ERROR, 'its process ended')}: run again"
    elif ATTR_STOP in attrs:
        note = str(attrs[ATTR_STOP])
    if ATTR_RETRY_OF in attrs:
        note = f"retry of {attrs[ATTR_RETRY_OF]}" + (f"; {note}" if note else "")
    value = trial.value if state in ("COMPLETE", "PRUNED") else None
    return {
        "number": trial.number,
        "state": state,
        "params": dict(trial.params),
        "value": value,
        "epochs": attrs.get(ATTR_EPOCHS, len(trial.intermediate_values)),
        "seconds": round(seconds, 2) if seconds is not None else None,
        "run_dir": attrs.get(ATTR_RUN_DIR),
        "mlflow_run_id": attrs.get(ATTR_RUN_ID),
        "worker": attrs.get(ATTR_WORKER),
        "note": note,
    }


def trial_line(row: dict[str, Any], metric: str) -> str:
    """The line said when a trial finishes."""
    params = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items()
    )
    value = f"{metric} {row['value']:.4f}, " if row["value"] is not None else ""
    seconds = f", {row['seconds']:.1f} s" if row["seconds"] is not None else ""
    note = f" ({row['note']})" if row["note"] else ""
    epochs = f"{row['epochs']} epoch" + ("" if row["epochs"] == 1 else "s")
    return f"trial {row['number']} {row['state'].lower()}: {value}{epochs}{seconds}; {params}{note}"


@dataclass
class SweepResult:
    """What a sweep left: its trials, the best one, the recipe written from it."""

    name: str
    spec: Path
    db: Path
    folder: Path
    metric: str
    direction: str
    n_trials: int
    param_keys: list[str]
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None = None
    recipe: Path | None = None
    parent_run_id: str | None = None
    ran: int = 0  # trials finished by this command
    seconds: float = 0.0  # this command's trial time
    error: CtscanError | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready, for `--json` and the table."""
        counts: dict[str, int] = {}
        for row in self.trials:
            counts[row["state"].lower()] = counts.get(row["state"].lower(), 0) + 1
        return {
            "study": self.name,
            "spec": str(self.spec),
            "optuna_storage": str(self.db),
            "sweep_folder": str(self.folder),
            "metric": self.metric,
            "direction": self.direction,
            "trials_wanted": self.n_trials,
            "counts": counts,
            "param_keys": self.param_keys,
            "best": self.best,
            "recipe": str(self.recipe) if self.recipe is not None else None,
            "mlflow_parent_run_id": self.parent_run_id,
            "trials_run_now": self.ran,
            "seconds_now": round(self.seconds, 2),
            "trials_per_hour": round(3600 * self.ran / self.seconds, 1) if self.seconds else None,
            "trials": self.trials,
        }


def recipe_text(sweep: Sweep, best: dict[str, Any]) -> str:
    """The best trial as a settings file: base files + [fixed] + its parameters, as TOML."""
    data = deep_merge(sweep.base, _nest(sweep.spec.fixed))
    data = deep_merge(data, _nest(best["params"]))
    data = deep_merge(data, {"train": {"select_metric": sweep.spec.metric}})
    bases = ", ".join(str(p) for p in sweep.files) or "the defaults"
    lines = [
        f"# The best trial of the ctscan sweep '{sweep.name}' (spec {sweep.spec.path}): trial "
        f"{best['number']},",
        f"# {sweep.spec.metric} {best['value']:.6g} ({sweep.spec.direction}) after "
        f"{best['epochs']} epochs on the validation split.",
        f"# Base settings ({bases}), the spec's [fixed] and the trial's parameters, merged.",
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
    ensure_dir(path.parent, what="recipe folder", error=SweepError)
    text = recipe_text(sweep, best).encode()
    atomic_write(path, lambda fh: fh.write(text))
    load_settings([path])
    return path


def _parent_params(sweep: Sweep) -> dict[str, Any]:
    spec = sweep.spec
    params: dict[str, Any] = {
        "sweep.metric": spec.metric,
        "sweep.direction": spec.direction,
        "sweep.sampler": spec.sampler,
        "sweep.seed": spec.seed,
        "sweep.pruning": spec.pruning,
        "sweep.settings": ", ".join(str(p) for p in sweep.files),
    }
    params |= {f"space.{p.key}": p.describe() for p in spec.params}
    params |= {f"fixed.{key}": value for key, value in spec.fixed.items()}
    return params


def experiment_fix(experiment: str) -> str:
    """The fix when the sweep's parent run lives in another MLflow experiment (`ctscan sweep`
    takes no --set, and its base files are part of the study: the environment it is)."""
    variable = shlex.quote(f"{env_name('tracking.experiment')}={experiment}")
    return (
        f"continue with tracking.experiment = {json.dumps(experiment)} set through the "
        f"environment ({variable} before the command), or start a new study (--name)."
    )


def _open_parent(sweep: Sweep, study: Any) -> Any:
    """The sweep's MLflow run (reopened on a rerun), detached: trials nest under it."""
    from ctscan.engine.tracking import open_parent_run

    return open_parent_run(
        sweep.settings.tracking,
        runs_dir=sweep.runs_dir,
        run_name=f"sweep-{sweep.name}",
        recorded_id=study.user_attrs.get(ATTR_PARENT_RUN),
        tags={"kind": "sweep", TAG_SWEEP: sweep.name, "optuna_storage": str(sweep.db)},
        params=_parent_params(sweep),
        experiment_fix=experiment_fix,
        record=lambda run_id: study.set_user_attr(ATTR_PARENT_RUN, run_id),
    )


def run_sweep(
    spec: str | Path,
    *,
    trials: int | None = None,
    jobs: int = 1,
    name: str | None = None,
    recipe: Path | None = None,
    say: Callable[[str], None] = say_line,
) -> SweepResult:
    """Run (or continue) a sweep until its study holds N finished trials; write the recipe.

    Ctrl-C and SIGTERM stop it with an `Interrupted` error that says how to continue (exit
    130 / 143 from the CLI); the finished trials stay in the study.
    """
    sweep = prepare(spec, trials=trials, jobs=jobs, name=name, recipe=recipe)
    optuna = _import_optuna()
    folder = ensure_dir(sweep.folder, what="sweep folder", error=SweepError)
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        with _sweep_lock(sweep, folder):
            return _run(optuna, sweep, recipe or folder / "best.toml", say)
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _sweep_lock(sweep: Sweep, folder: Path) -> Iterator[None]:
    """One `ctscan sweep` per study at a time."""
    try:
        with folder_lock(folder, what="sweep folder", error=SweepError):
            yield
    except SweepError as exc:
        if "in use by another ctscan process" not in exc.message:
            raise
        raise SweepError(
            f"study '{sweep.name}' is being run by another `ctscan sweep` ({exc.message})",
            "wait for it to finish (--jobs J runs trials side by side), or pass another --name.",
        ) from None


def _run(optuna: Any, sweep: Sweep, recipe: Path, say: Callable[[str], None]) -> SweepResult:
    study = open_study(optuna, sweep, create=True)
    try:  # the parent run first: a refusal (another experiment) comes before any change
        tracker = _open_parent(sweep, study)
    except KeyboardInterrupt as exc:  # a parent created before the stop is recorded
        raise _stopped(sweep, study, exc) from None
    ran = 0

    def announce(trial: Any) -> None:
        nonlocal ran
        row = _trial_row(trial)
        ran += _counts(trial)
        say(trial_line(row, sweep.spec.metric))
        if row["value"] is not None:
            tracker.log_metrics({sweep.spec.metric: row["value"]}, step=row["number"])

    t0 = time.perf_counter()
    try:
        with tracker:
            todo = _plan_trials(optuna, sweep, study, say)
            if todo and sweep.jobs > 1:
                run_workers(sweep, study, announce)
            elif todo:
                work(optuna, sweep, study, tracker.run_id, announce)
            result = _result(sweep, study, recipe, tracker.run_id)
            result.ran, result.seconds = ran, time.perf_counter() - t0
            _log_end(tracker, result)
            return result
    except KeyboardInterrupt as exc:
        raise _stopped(sweep, study, exc) from None


def _plan_trials(optuna: Any, sweep: Sweep, study: Any, say: Callable[[str], None]) -> int:
    """Queue again the trials an earlier run left unfinished, say so; the trials to run."""
    done = finished(study)
    todo = max(0, sweep.n_trials - done)
    again, left = requeue_unfinished(optuna, study, todo)
    if again:
        say(f"trials {', '.join(map(str, again))} were left unfinished: they run again")
    if left:
        say(
            f"trials {', '.join(map(str, left))} were left unfinished and are not needed for "
            f"{sweep.n_trials} finished trials: they do not run again (a larger --trials runs them)"
        )
    say(
        f"sweep '{sweep.name}': {done} of {sweep.n_trials} trials finished, {todo} to run"
        + (f" in {min(sweep.jobs, todo)} processes" if sweep.jobs > 1 and todo else "")
        + f"; study in {sweep.db}, runs in {sweep.folder}"
    )
    return todo


def _stopped(sweep: Sweep, study: Any, exc: KeyboardInterrupt) -> Interrupted:
    terminated = isinstance(exc, Terminated)
    how = "by SIGTERM" if terminated else "by Ctrl-C"
    return Interrupted(
        f"sweep '{sweep.name}' stopped {how} with {finished(study)} of {sweep.n_trials} "
        f"trials finished, kept in '{sweep.db}'.",
        f"rerun `{sweep.command}` to continue (an interrupted trial starts again).",
        terminated=terminated,
    )


def _result(sweep: Sweep, study: Any, recipe: Path, parent_run_id: str | None) -> SweepResult:
    rows = [_trial_row(t) for t in study.get_trials(deepcopy=False)]
    result = SweepResult(
        name=sweep.name,
        spec=sweep.spec.path,
        db=sweep.db,
        folder=sweep.folder,
        metric=sweep.spec.metric,
        direction=sweep.spec.direction,
        n_trials=sweep.n_trials,
        param_keys=[p.key for p in sweep.spec.params],
        trials=rows,
        parent_run_id=parent_run_id,
    )
    complete = [row for row in rows if row["state"] == "COMPLETE"]
    if not complete:
        counts = ", ".join(f"{s.lower()} {sum(r['state'] == s for r in rows)}" for s in _STATES)
        result.error = SweepError(
            f"no trial of study '{sweep.name}' completed ({counts}): no recipe was written.",
            "run more trials (a larger --trials), or turn pruning off (pruning = false in "
            "[sweep]); the table and the worker logs say why trials failed.",
        )
        return result
    pick = max if sweep.spec.direction == "maximize" else min
    result.best = pick(complete, key=lambda row: row["value"])
    result.recipe = write_recipe(sweep, result.best, recipe)
    return result


_STATES = ("PRUNED", "FAIL")


def _log_end(tracker: Any, result: SweepResult) -> None:
    """The parent run's summary: best value, trial counts, the recipe and the trials table."""
    counts = result.summary()["counts"]
    metrics = {f"trials_{state}": float(n) for state, n in counts.items()}
    if result.best is not None:
        metrics[f"best_{result.metric}"] = result.best["value"]
        tracker.set_tags({"best_trial": str(result.best["number"])})
    tracker.log_metrics(metrics, step=len(result.trials))
    if result.recipe is not None:
        tracker.log_artifact(result.recipe)
    tracker.log_dict(result.summary(), "sweep.json")


if __name__ == "__main__":
    from ctscan.ops.sweep import worker_main as _worker_main  # the module, not a __main__ copy

    sys.exit(_worker_main(sys.argv[1:]))

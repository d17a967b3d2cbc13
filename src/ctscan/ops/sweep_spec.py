"""What a sweep is, checked before anything runs: its spec (TOML, docs/sweep.md), base settings
and --set; each trial's settings and the best one's recipe. Running the study: ops/sweep.py."""

from __future__ import annotations

import itertools
import math
import re
import shlex
import tomllib
from dataclasses import dataclass
from functools import reduce
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    ValidationError,
    field_validator,
    model_validator,
)

from ctscan.errors import CtscanError, SettingsError, close_matches
from ctscan.files import atomic_write, ensure_dir, hide_password
from ctscan.settings import (
    RECIPE_DIR,
    Settings,
    TrainSettings,
    deep_merge,
    explain,
    find_toml,
    load_settings,
    parse_overrides,
    read_settings_file,
    toml_value,
)

Metric = TrainSettings.model_fields["select_metric"].annotation
SEARCHABLE_SECTIONS = ("model", "augment", "train")
# Set by the sweep for every trial: the spec may not set them (the recipe gets select_metric).
FORCED_KEYS = ("train.evaluate_test", "train.select_metric", "tracking.log_model")
SPEC_DIR = RECIPE_DIR / "sweeps"  # sweep specs (not settings files: `-s` cannot load them)
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
SPEC_FIX = "see docs/sweep.md for the spec format."
STORAGE_FORMS = "sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DATABASE"
ALL_KEYS = [
    f"{name}.{key}"
    for name, f in Settings.model_fields.items()
    for key in f.annotation.model_fields
]
# ---- the spec ---------------------------------------------------------------------------


def _setting(key: str) -> Any:
    """The settings field a dotted key names, if the spec may set it."""
    section, _, name = key.partition(".")
    if key not in ALL_KEYS:
        raise ValueError(
            f"unknown settings key '{key}'.{close_matches(key, ALL_KEYS)} Name "
            "keys as `ctscan settings show` lists them: section.key (e.g. train.lr)"
        )
    if key in FORCED_KEYS:
        raise ValueError(
            f"'{key}' is one of the keys the sweep sets for every trial (train.evaluate_test and "
            "tracking.log_model off, train.select_metric = the metric): remove it"
        )
    return Settings.model_fields[section].annotation.model_fields[name]


def dotted_keys(table: dict[str, Any], prefix: str = "", params: bool = False) -> dict[str, Any]:
    """Nested tables to dotted keys; with `params`, a table holding a non-table is a leaf."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        leaf = not isinstance(value, dict) or (
            params and (not value or any(not isinstance(v, dict) for v in value.values()))
        )
        if not leaf:
            out.update(dotted_keys(value, f"{prefix}{key}.", params))
        else:
            out[f"{prefix}{key}"] = value
    return out


class Param(BaseModel):
    """One searched setting: a float or int range (optionally log or stepped) or choices."""

    model_config = ConfigDict(extra="forbid")
    key: str = Field(exclude=True)  # the dotted settings key: the [params] table's name
    low: StrictFloat | None = None
    high: StrictFloat | None = None
    log: StrictBool = False
    step: StrictFloat | None = Field(None, gt=0)
    choices: tuple[Any, ...] | None = Field(None, min_length=1)

    @property
    def integer(self) -> bool:
        return _setting(self.key).annotation is int

    @model_validator(mode="after")
    def _fits_its_setting(self) -> Param:
        info, given = _setting(self.key), self.model_fields_set - {"key"}
        if self.key.partition(".")[0] not in SEARCHABLE_SECTIONS:
            raise ValueError(
                f"a sweep searches the {', '.join(SEARCHABLE_SECTIONS)} sections: move "
                f"'{self.key}' to [fixed] or a base file (it is the same for the whole sweep)"
            )
        if self.choices is not None:
            if extra := [k for k in ("low", "high", "log", "step") if k in given]:
                raise ValueError(f"has both choices and {', '.join(extra)}: keep one")
            if any(isinstance(c, (dict, list)) for c in self.choices) or len(
                set(map(repr, self.choices))
            ) < len(self.choices):
                raise ValueError("choices must be distinct numbers, strings or booleans")
            return self
        if self.low is None or self.high is None:
            raise ValueError("a parameter needs low and high (a range) or choices = [...]")
        if info.annotation not in (int, float):
            raise ValueError(f"'{self.key}' is not a number setting: give choices = [...]")
        bounds = [v for v in (self.low, self.high, self.step) if v is not None]
        if self.integer and not all(float(v).is_integer() for v in bounds):
            raise ValueError(f"low, high and step must be integers for '{self.key}', not {bounds}")
        if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
            raise ValueError(f"low {self.low} must be below high {self.high}: swap or correct them")
        if self.log and self.low <= 0:
            raise ValueError(f"a log range needs low > 0, not {self.low}: fix low or drop log")
        if self.log and self.step is not None:
            raise ValueError("step cannot go with log = true: drop one")
        kind = int if self.integer else float
        self.low, self.high = kind(self.low), kind(self.high)
        self.step = None if self.step is None else kind(self.step)
        return self

    def suggest(self, trial: Any) -> Any:
        """This parameter's value for an Optuna trial."""
        if self.choices is not None:
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.integer:
            return trial.suggest_int(
                self.key, self.low, self.high, step=self.step or 1, log=self.log
            )
        return trial.suggest_float(self.key, self.low, self.high, step=self.step, log=self.log)

    def drawn_extremes(self) -> tuple[Any, ...]:
        """Every choice, or the lowest and highest value a trial can draw (as Optuna steps)."""
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
        text = f"{'int' if self.integer else 'float'} [{self.low}, {self.high}]"
        return text + (" log" if self.log else "") + (f" step {self.step}" if self.step else "")


class SweepOptions(BaseModel):
    """[sweep]: the metric, how trials are drawn and pruned, base settings files."""

    model_config = ConfigDict(extra="forbid", strict=True)
    metric: Metric
    direction: Literal["maximize", "minimize"] | None = None  # follows the metric
    sampler: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    trials: int | None = Field(None, ge=1)
    settings: Annotated[list[str], BeforeValidator(lambda v: [v] if isinstance(v, str) else v)] = []
    pruning: bool = True
    pruning_startup_trials: int = Field(5, ge=0)
    pruning_warmup_epochs: int = Field(0, ge=0)
    tpe_startup_trials: int = Field(10, ge=0)
    heartbeat_interval: int = Field(60, ge=1)  # seconds between a running trial's heartbeats
    grace_period: int = Field(120, ge=1)  # seconds without one before another process retries

    @model_validator(mode="after")
    def _natural_direction(self) -> SweepOptions:
        natural = "minimize" if self.metric == "val_loss" else "maximize"
        if self.direction not in (None, natural):
            raise ValueError(
                f"direction '{self.direction}' for {self.metric} would search for the worst "
                f"models: write direction = '{natural}' (or leave it out)"
            )
        self.direction = natural
        return self


class SpecFile(BaseModel):
    """A spec's TOML as written: [sweep], [fixed] and [params] (docs/sweep.md)."""

    model_config = ConfigDict(extra="forbid")
    sweep: SweepOptions
    fixed: dict[str, Any] = {}  # dotted key -> value
    params: dict[str, Param] = Field({}, validate_default=True)

    @field_validator("fixed", "params", mode="before")
    @classmethod
    def _dotted(cls, value: Any, info: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if info.field_name == "fixed":
            fixed = dotted_keys(value)
            for key in fixed:
                _setting(key)  # a key the spec may not set raises
            return fixed
        tables = dotted_keys(value, params=True)
        return {k: {**v, "key": k} if isinstance(v, dict) else v for k, v in tables.items()}

    @field_validator("params")
    @classmethod
    def _some_params(cls, params: dict[str, Param], info: Any) -> dict[str, Param]:
        if not params:
            raise ValueError("the spec has no [params]: there is nothing to search")
        for key in params.keys() & info.data.get("fixed", {}).keys():
            raise ValueError(f"'{key}' is both in [fixed] and in [params]: keep one")
        return params


class SweepSpec(SweepOptions):
    """A parsed sweep spec: its [sweep] values, file, parameters and fixed values."""

    path: Path
    params: tuple[Param, ...]
    fixed: dict[str, Any] = {}

    def search_identity(self) -> dict[str, Any]:
        """What decides the trials (not where the spec lies nor how many trials): JSON-ready."""
        where = {"path", "trials", "settings", "heartbeat_interval", "grace_period", "params"}
        return self.model_dump(exclude=where) | {
            "params": {p.key: p.to_dict() for p in self.params}
        }


def _spec_error(path: Path, message: str, fix: str = SPEC_FIX) -> SettingsError:
    return SettingsError(f"sweep spec '{path}': {message}", fix)


def parse_spec(data: dict[str, Any], path: Path) -> SweepSpec:
    """Check a spec's TOML data and return it parsed: every mistake is one SettingsError."""
    try:
        spec = SpecFile.model_validate(data)
    except ValidationError as exc:
        error = explain(exc, "", {}, [], {}, model=SpecFile, what="spec key")
        message = error.message.rstrip(".")
        raise _spec_error(path, message + ("" if message.endswith("?") else ".")) from None
    options = spec.sweep.model_dump()
    return SweepSpec(**options, path=path, params=tuple(spec.params.values()), fixed=spec.fixed)


def find_spec(name: str | Path) -> Path:
    """A spec file path, or a name looked up as settings/sweeps/<name>.toml."""
    fix = f"pass a sweep spec TOML file or its name in {SPEC_DIR}/ (e.g. cpu-smoke)."
    return find_toml(name, SPEC_DIR, what="sweep spec", listed="Specs", fix=fix)


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
        f"--storage '{hide_password(url)}' is neither a SQLite file nor a PostgreSQL database.",
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
    recipe_path: Path | None = None  # --recipe (default: best.toml in the sweep folder)

    @property
    def folder(self) -> Path:
        """The sweep folder: trial run folders, the recipe."""
        return self.settings.paths.runs_dir / "sweeps" / self.name

    @property
    def recipe(self) -> Path:
        """Where the best trial's settings file goes."""
        return self.recipe_path or self.folder / "best.toml"

    @property
    def where(self) -> str:
        """The storage as messages show it: a SQLite file's path, a URL without its password."""
        return str(self.db) if self.db else hide_password(self.storage_url)

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
    for name in spec.settings:
        beside = spec.path.parent / name
        try:
            path = beside if beside.is_file() else find_toml(name)
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
    given = dotted_keys(parse_overrides(overrides))
    for key in given:
        if (searched := key in {p.key for p in spec.params}) or key in FORCED_KEYS:
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
    base = reduce(deep_merge, map(read_settings_file, files), {})
    settings = _spec_settings(spec, files, given, {})
    _check_drawable(spec, files, given)
    url, db = _storage(storage, settings.paths.runs_dir)
    command = ["ctscan", "sweep", str(spec_name), "--trials", str(n_trials)]
    command += ["--name", study] if name else []
    command += ["--recipe", str(recipe)] if recipe is not None else []
    command += ["--storage", storage] if storage else []
    command += [arg for item in overrides for arg in ("--set", item)]
    command_text = hide_password(shlex.join(command))
    return Sweep(spec, study, n_trials, files, base, given, settings, url, db, command_text, recipe)


def _check_drawable(spec: SweepSpec, files: tuple[Path, ...], given: dict[str, Any]) -> None:
    """Refuse a bound or choice that no trial can use: each alone, then one refused only by a
    check across keys with the extremes the spec draws for its partners (one fit is enough;
    trials that draw a refused combination are pruned)."""
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
    values = {**sweep.spec.fixed, **sweep.given, **best["params"]}
    values["train.select_metric"] = sweep.spec.metric
    data = deep_merge(sweep.base, parse_overrides(_overrides(values)))
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
    atomic_write(path, recipe_text(sweep, best).encode())
    load_settings([path])
    return path

"""Settings: one tree of nested sections, loaded from TOML files, env and the command line.

Precedence (highest first): command-line overrides (`--set section.key=value`), environment
variables (`CTSCAN_SECTION__KEY=value`), settings files (later files win), the defaults below
(mirrored in `settings/default.toml`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from collections.abc import Mapping
from functools import reduce
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ctscan.errors import SettingsError, close_matches

ENV_PREFIX = "CTSCAN_"
ENV_NOT_SETTINGS = {"CTSCAN_DEBUG"}
RECIPE_DIR = Path("settings")
SECRET_KEYS = frozenset({"serve.token"})  # never written to settings.toml, MLflow or the screen
REDACTED = "<redacted>"


class KeysConflict(ValueError):
    """A check across keys of one section failed: `values` names those keys and their values,
    so the message can point at each key and where it was set (not at the whole section)."""

    def __init__(self, message: str, values: Mapping[str, Any]) -> None:
        super().__init__(message)
        self.values = dict(values)


def _numeric(annotation: Any) -> bool:
    """Whether a field takes a number (int or float, alone or with None)."""
    return bool({int, float} & {annotation, *get_args(annotation)})


class Section(BaseModel):
    """A settings section: unknown keys are errors, and numbers are not booleans."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic's lax mode reads true as 1 and false as 0: train.epochs=true would train one
        # epoch and augment.hflip=true flip every image, without a word
        if isinstance(value, bool) and _numeric(cls.model_fields[str(info.field_name)].annotation):
            raise ValueError(f"a number is needed here, not the boolean {str(value).lower()}")
        return value


def _not_empty_path(value: Any) -> Any:
    """Refuse "" (and blanks) for a path: Path("") would silently mean the current folder."""
    if isinstance(value, str) and not value.strip():
        raise ValueError(
            "an empty path is not allowed (it would mean the current folder); give a path, "
            "or leave the key out for its default"
        )
    return value


NonEmptyPath = Annotated[Path, BeforeValidator(_not_empty_path)]


class PathsSettings(Section):
    raw_dir: NonEmptyPath = Field(
        Path("data/chest-ctscan-images"),
        description="the Kaggle folders (train/valid/test/<class>/), pulled by `dvc pull`",
    )
    processed_dir: NonEmptyPath = Field(
        Path("outputs/processed"),
        description="the processed store preprocess writes and train/evaluate read",
    )
    runs_dir: NonEmptyPath = Field(
        Path("outputs/runs"), description="run folders, the MLflow SQLite store and its artifacts"
    )


class DataSettings(Section):
    image_size: int = Field(160, ge=16, le=1024, description="side of the square stored image (px)")
    resize: Literal["pad", "stretch", "crop"] = Field(
        "pad",
        description="pad: keep aspect, fit the long side, pad with black; stretch: ignore aspect; "
        "crop: fit the short side, centre-crop",
    )
    max_image_pixels: int = Field(40_000_000, ge=1, description="images above this: refused")
    max_file_bytes: int = Field(50_000_000, ge=1, description="files above this size: refused")
    on_bad_file: Literal["error", "skip"] = Field(
        "error",
        description="error: stop at the first unreadable image; skip: leave it out and list it",
    )
    on_leak: Literal["keep", "drop"] = Field(
        "keep",
        description="keep: official split, report only; drop: remove valid/test copies of train "
        "images and images seen under two labels",
    )
    near_duplicate_distance: int = Field(
        4, ge=0, le=64, description="max Hamming distance of 64-bit dHashes for a near-duplicate"
    )


class ModelSettings(Section):
    name: Literal["cnn", "cnn_gap", "resnet18", "efficientnet_lite0"] = Field(
        "efficientnet_lite0",
        description="registry model: cnn, cnn_gap, resnet18 or efficientnet_lite0",
    )
    pretrained: bool = Field(
        True, description="from ImageNet weights (resnet18, efficientnet_lite0)"
    )
    weights_path: Annotated[Path | None, BeforeValidator(_not_empty_path)] = Field(
        None, description="local ImageNet weights file (optional)"
    )
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="before the classification head")
    freeze_epochs: int = Field(1, ge=0, description="epochs with the pretrained backbone frozen")
    frozen_stages: int = Field(
        3,
        ge=0,
        description="the stem and the first N stages of a pretrained backbone stay frozen for all "
        "of training, which skips their backward pass (efficientnet_lite0: 7 stages, resnet18: "
        "4); 0 = none; ignored when training from scratch, like freeze_epochs",
    )

    @model_validator(mode="after")
    def _frozen_stages_fit(self) -> ModelSettings:
        from ctscan.models import backbone_stages

        stages = backbone_stages(self.name)
        if self.pretrained and stages and self.frozen_stages > stages:
            raise KeysConflict(
                f"{self.name} has {stages} stages: set model.frozen_stages to 0..{stages} "
                "(0 trains every stage)",
                {"frozen_stages": self.frozen_stages, "name": self.name},
            )
        return self


class AugmentSettings(Section):
    enabled: bool = Field(True, description="batched, of the train split, on the training device")
    rotation_deg: float = Field(15.0, ge=0.0, le=180.0, description="largest angle, either way")
    scale_min: float = Field(0.9, gt=0.0, description="smallest zoom factor")
    scale_max: float = Field(1.1, gt=0.0, description="largest zoom factor")
    translate: float = Field(0.05, ge=0.0, le=0.5, description="max shift, fraction of the side")
    hflip: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    vflip: float = Field(0.0, ge=0.0, le=1.0, description="probability of a vertical flip")
    brightness: float = Field(0.1, ge=0.0, le=1.0, description="max offset (of full scale)")
    contrast: float = Field(0.1, ge=0.0, le=1.0, description="max contrast change (fraction)")
    erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability of one random erase")
    mixup_alpha: float = Field(
        0.0, ge=0.0, le=10.0, description="MixUp: Beta(alpha, alpha) of the mix; 0 = off"
    )
    cutmix_alpha: float = Field(
        0.0, ge=0.0, le=10.0, description="CutMix: Beta(alpha, alpha) of the kept area; 0 = off"
    )
    mix_prob: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="share of batches mixed when mixup_alpha or cutmix_alpha > 0 (both: each "
        "mixed batch picks one)",
    )

    @model_validator(mode="after")
    def _scale_order(self) -> AugmentSettings:
        if self.scale_min > self.scale_max:
            raise KeysConflict(
                "scale_min must not exceed scale_max",
                {"scale_min": self.scale_min, "scale_max": self.scale_max},
            )
        return self


class TrainSettings(Section):
    epochs: int = Field(20, ge=1, description="epochs to train (a resume may raise it)")
    batch_size: int = Field(32, ge=1, description="per step and process (DDP: global = N x this)")
    lr: float = Field(2e-3, gt=0.0, description="AdamW's peak (not scaled under DDP)")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW's, not on biases or norm weights")
    warmup_epochs: float = Field(1.0, ge=0.0, description="linear, before the cosine decay")
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0, description="of the cross-entropy loss")
    grad_clip: float = Field(1.0, ge=0.0, description="max grad norm; 0 disables")
    accumulate: int = Field(1, ge=1, description="gradient accumulation steps")
    ema: bool = Field(True, description="a moving average of the weights, which checkpoints deploy")
    ema_decay: float = Field(0.99, gt=0.0, lt=1.0, description="EMA decay per optimizer step")
    ema_warmup: bool = Field(
        True,
        description="ramp the EMA decay as min(ema_decay, (1+n)/(10+n)) over the n updates so far,"
        " so the average forgets the initial weights (false: ema_decay from the first step)",
    )
    early_stop_patience: int = Field(0, ge=0, description="epochs without improvement; 0 = off")
    select_metric: Literal["val_macro_f1", "val_accuracy", "val_loss"] = Field(
        "val_macro_f1", description="validation metric that picks best.pt"
    )
    seed: int = Field(0, description="random seed (data order, augmentation, initialisation)")
    deterministic: bool = Field(False, description="kernels (bit-identical CPU runs, slower GPU)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto (CUDA if available), cpu or cuda"
    )
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on CUDA, fp32 on CPU; fp16 uses a GradScaler (CUDA only)"
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto", description="torch.compile the model: auto = on for CUDA"
    )
    channels_last: bool = Field(True, description="channels-last memory format for convolutions")
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = all cores")
    checkpoint_every: int = Field(
        1, ge=1, description="write last.pt every N epochs (and at the end); resume starts there"
    )
    quiet: bool = Field(False, description="plain log lines instead of the live progress bar")
    evaluate_test: bool = Field(True, description="evaluate the best checkpoint on test at the end")
    calibrate: bool = Field(
        True,
        description="at the end, fit best.pt's temperature T on the validation split (never "
        "test) so the probabilities shown are softmax(logits / T); false: T = 1, uncalibrated",
    )


class TrackingSettings(Section):
    enabled: bool = Field(True, description="MLflow runs (false: mlflow is not even imported)")
    uri: str | None = Field(None, description="default: sqlite:///<runs_dir>/mlflow.db")
    experiment: str = Field("ctscan", description="MLflow experiment name")
    registered_model: str = Field("ctscan-classifier", description="the best models' registry name")
    log_model: bool = Field(True, description="register the best model at the end of training")


class ServeSettings(Section):
    host: str = Field("127.0.0.1", description="address `ctscan serve` binds")
    port: int = Field(8000, ge=1, le=65535, description="port `ctscan serve` listens on")
    workers: int = Field(1, ge=1, description="uvicorn worker processes, each with the model")
    backend: Literal["auto", "torch", "onnx", "openvino"] = Field(
        "auto",
        description="auto: ONNX Runtime when the model is or can be exported, else torch; "
        "openvino: the ONNX model on OpenVINO (docs/serving.md)",
    )
    model_name: str = Field("ctscan", min_length=1, description="the name in /v2/models/{name}")
    max_upload_bytes: int = Field(20_000_000, ge=1, description="largest file accepted (413)")
    max_batch_files: int = Field(32, ge=1, description="most files in one /predict/batch")
    token: str | None = Field(None, description="bearer token for every route but health (401)")
    batching: bool = Field(True, description="gather concurrent requests into one model call")
    max_batch_size: int = Field(8, ge=1, description="most images in one model call")
    max_wait_ms: float = Field(0.0, ge=0.0, description="longest wait to fill a batch")
    queue_size: int = Field(256, ge=1, description="requests waiting at most; then 503")
    drift_window: int = Field(500, ge=10, description="recent requests kept for drift tests")
    drift_min_samples: int = Field(50, ge=10, description="requests before drift is judged")
    shutdown_timeout_s: float = Field(30.0, ge=0.0, description="SIGTERM: finish in-flight")


class InferenceSettings(Section):
    batch_size: int = Field(32, ge=1, description="images per model call in ctscan predict")
    decode_threads: int = Field(
        0,
        ge=0,
        le=64,
        description="threads decoding files ahead of the model in ctscan predict, and "
        "uploads in ctscan serve; 0 = min(4, cores), 1 = predict decodes in its own thread",
    )
    onnx_spinning: bool = Field(
        False,
        description="let ONNX Runtime's threads spin-wait between operators: a little lower "
        "latency for one request on an idle machine, but CPU taken from the decoding and HTTP "
        "threads under load (ctscan serve: 57 -> 73 requests/s at 16 clients on 2 cores)",
    )
    dicom_window_level: float = Field(-600.0, description="Hounsfield window centre (lung: -600)")
    dicom_window_width: float = Field(1500.0, gt=0.0, description="window width, HU (lung: 1500)")


class Settings(BaseSettings):
    """The whole resolved configuration of a ctscan command."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    paths: PathsSettings = Field(default_factory=PathsSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    augment: AugmentSettings = Field(default_factory=AugmentSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    tracking: TrackingSettings = Field(default_factory=TrackingSettings)
    serve: ServeSettings = Field(default_factory=ServeSettings)
    inference: InferenceSettings = Field(default_factory=InferenceSettings)
    # what the user gave (load_settings): the files as named, the overrides, the dotted keys set
    _files: tuple[str, ...] = PrivateAttr(default=())
    _overrides: tuple[str, ...] = PrivateAttr(default=())
    _given: frozenset[str] = PrivateAttr(default=frozenset())


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Return `base` updated by `update`, merging nested dicts key by key."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def find_toml(
    name: str | Path,
    folder: Path = RECIPE_DIR,
    *,
    what: str = "settings file",
    listed: str = "Recipes",
    fix: str = "pass an existing TOML file or a recipe name to --settings.",
) -> Path:
    """A TOML file named by its path, or by NAME as FOLDER/NAME.toml (a recipe, a sweep spec)."""
    path = Path(name)
    if path.is_file():
        return path
    if path.suffix == "" and (named := folder / f"{name}.toml").is_file():
        return named
    if path.is_dir():
        inside = sorted(str(p) for p in path.glob("*.toml"))[:5]
        hint = f" TOML files in it: {', '.join(inside)}." if inside else ""
        raise SettingsError(f"{what} '{name}' is a directory; a TOML file is expected.{hint}", fix)
    names = sorted(p.stem for p in folder.glob("*.toml")) if folder.is_dir() else []
    hint = f" {listed} in {folder}/: {', '.join(names)}." if names else ""
    raise SettingsError(f"{what} '{name}' does not exist.{hint}", fix)


def read_settings_file(path: Path) -> dict[str, Any]:
    """Parse one TOML settings file."""
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(
            f"settings file '{path}' is not valid TOML: {exc}.", "correct the TOML syntax."
        ) from None
    except OSError as exc:
        raise SettingsError(f"cannot read settings file '{path}': {exc.strerror}.") from None


def _parse_value(text: str) -> Any:
    """A TOML value if `text` parses as one (numbers, booleans, arrays), else the raw string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Turn `section.key=value` strings into a nested dict."""
    result: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SettingsError(
                f"override '{item}' is not of the form section.key=value.",
                "write e.g. --set train.epochs=5.",
            )
        node = result
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SettingsError(f"override '{item}' sets both '{part}' and a key inside it.")
        node[parts[-1]] = _parse_value(raw.strip())
    return result


def _section_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The keys a user may give at a location of a tree of models (a dict of models takes any
    key; an excluded field is set by the program)."""
    current: Any = model
    for part in loc[:-1]:
        if get_origin(current) is dict:
            current = get_args(current)[1]
        elif isinstance(current, type) and issubclass(current, BaseModel):
            current = getattr(current.model_fields.get(str(part)), "annotation", None)
    is_model = isinstance(current, type) and issubclass(current, BaseModel)
    return [k for k, f in current.model_fields.items() if not f.exclude] if is_model else []


def _env_value(section: str, key: str) -> str | None:
    """The environment variable that sets section.key, as pydantic-settings reads it.

    Names are case-insensitive, and a whole section may come as JSON (`CTSCAN_TRAIN='{...}'`),
    whose keys are case-insensitive too.
    """
    by_name = {var.upper(): var for var in os.environ}
    if var := by_name.get(f"{ENV_PREFIX}{section.upper()}__{key.upper()}"):
        return var
    var = by_name.get(f"{ENV_PREFIX}{section.upper()}")
    try:
        data = json.loads(os.environ[var]) if var else None
    except ValueError:
        return None
    return var if isinstance(data, dict) and key.lower() in {str(k).lower() for k in data} else None


def _source_of(
    loc: tuple[Any, ...],
    cli: dict[str, Any],
    files: list[tuple[Path, Any]],
    origins: Mapping[str, str],
) -> str:
    """Where the value at `loc` (section, key) came from: --set (or a flag), env, or a file."""
    if len(loc) == 1:  # an unknown section: the --set or the file that names it
        section = str(loc[0])
        if isinstance(cli.get(section), dict) and cli[section]:
            dotted = f"{section}.{next(iter(cli[section]))}"
            return origins.get(dotted, f"--set {dotted}")
        return next((f"{path}" for path, data in reversed(files) if section in data), "")
    if len(loc) != 2:
        return ""
    section, key = str(loc[0]), str(loc[1])
    if key in (cli.get(section) or {}):
        return origins.get(f"{section}.{key}", f"--set {section}.{key}")
    if (var := _env_value(section, key)) is not None:
        return f"environment variable {var}"
    for path, data in reversed(files):  # later files win
        if isinstance(data.get(section), dict) and key in data[section]:
            return f"{path}"
    return ""


def explain(
    exc: ValidationError,
    sources: str,
    cli: dict[str, Any],
    files: list[tuple[Path, Any]],
    origins: Mapping[str, str],
    *,
    model: type[BaseModel] = Settings,
    what: str = "settings key",
) -> SettingsError:
    """One message for a pydantic validation error of `model` (the settings tree, a sweep
    spec): each key, its value (not a whole table) and where it was set; close matches for
    unknown keys and values."""
    lines: list[str] = []
    conflict_keys: set[str] = set()
    named = True  # every line names its own source: no list of all sources at the end
    only_conflicts = True
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if isinstance(conflict := (err.get("ctx") or {}).get("error"), KeysConflict):
            # a check across keys fails at the section: name each key, its value and source
            parts = []
            for key, value in conflict.values.items():
                source = _source_of((*loc, key), cli, files, origins) or "the default"
                parts.append(f"'{dotted}.{key}' = {value!r} (from {source})")
                conflict_keys.add(f"{dotted}.{key}")
            lines.append(f"{', '.join(parts)}: {conflict}")
            continue
        only_conflicts = False
        source = _source_of(loc, cli, files, origins)
        named = named and bool(source)
        if err["type"] == "extra_forbidden":  # full dotted names (train.lr, not lr)
            prefix = "".join(f"{p}." for p in loc[:-1])
            hint = close_matches(dotted, [prefix + k for k in _section_keys(model, loc)])
            line = f"unknown {what} '{dotted}'.{hint}"
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            if err["type"] == "literal_error":
                expected = re.findall(r"'([^']*)'", err["ctx"]["expected"])
                if hint := close_matches(str(err.get("input")), expected):
                    msg += "." + hint
            value = err.get("input")
            shown = "" if isinstance(value, dict) else f" = {value!r}"  # a value, not a table
            line = f"'{dotted}'{shown}: {msg}"
        lines.append(line + (f" (from {source})" if source else ""))
    error = SettingsError(
        "; ".join(lines) + ("" if named or not sources else f" (from {sources})"),
        "see `ctscan settings show` for every key and its current value.",
    )
    if only_conflicts:
        error.conflict_keys = frozenset(conflict_keys)
    return error


def _check_env() -> None:
    """Reject CTSCAN_ variables that name no setting (they would be ignored otherwise)."""
    sections = {name.upper(): m for name, m in Settings.model_fields.items()}
    for var in os.environ:  # any case: pydantic-settings reads ctscan_train__epochs too
        upper = var.upper()
        if not upper.startswith(ENV_PREFIX) or upper in ENV_NOT_SETTINGS:
            continue
        section, _, key = upper[len(ENV_PREFIX) :].partition("__")
        field = sections.get(section)
        keys = list(field.annotation.model_fields) if field is not None else []
        if field is None or (key and key.lower() not in keys):
            known = [
                f"{ENV_PREFIX}{s}__{k.upper()}"
                for s, f in sections.items()
                for k in f.annotation.model_fields
            ]
            raise SettingsError(
                f"environment variable {var} names no setting.{close_matches(upper, known)}",
                "unset it or use CTSCAN_<SECTION>__<KEY>.",
            )


def load_settings(
    files: list[str | Path] | tuple[str | Path, ...] = (),
    overrides: list[str] | tuple[str, ...] = (),
    *,
    origins: Mapping[str, str] | None = None,
) -> Settings:
    """Resolve settings from files, env and overrides (highest precedence last).

    `origins` names, for an override's dotted key, how the user gave it (a command flag such as
    "--epochs", a sweep spec's table) for error messages; others read "--set KEY".
    """
    per_file = [(path, read_settings_file(path)) for path in map(find_toml, files)]
    file_data = reduce(deep_merge, (data for _, data in per_file), {})
    cli_data = parse_overrides(list(overrides))
    _check_env()

    class _Resolved(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            **_: PydanticBaseSettingsSource,  # no .env file, no secrets folder
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, InitSettingsSource(settings_cls, file_data))

    where = ", ".join([str(p) for p, _ in per_file] + ["environment", "--set"])
    try:
        resolved = _Resolved(**cli_data)
    except ValidationError as exc:
        raise explain(exc, where, cli_data, per_file, origins or {}) from None
    settings = Settings.model_validate(resolved.model_dump())
    settings._files = tuple(str(f) for f in files)
    settings._overrides = tuple(overrides)
    settings._given = frozenset(dotted(file_data) | dotted(cli_data))
    return settings


def dotted(tree: Mapping[str, Any]) -> dict[str, Any]:
    """`section.key -> value` for the keys of a tree of sections."""
    return {
        f"{s}.{k}": v for s, keys in tree.items() if isinstance(keys, dict) for k, v in keys.items()
    }


def is_given(settings: Settings, dotted: str) -> bool:
    """Whether a settings file, the environment or the command line set `section.key`."""
    section, _, key = dotted.partition(".")
    return dotted in settings._given or _env_value(section, key) is not None


def given_args(settings: Settings, sections: tuple[str, ...] = ("paths", "data")) -> str:
    """The `-s FILE` and `--set` arguments that set `sections` in `settings`, as a user would
    type them again (a message's fix repeats them; the environment stays set by itself)."""
    sets = [o for o in settings._overrides if o.partition(".")[0].strip() in sections]
    return " ".join(
        [f"-s {shlex.quote(f)}" for f in settings._files]
        + [f"--set {shlex.quote(o)}" for o in sets]
    )


def public_dict(settings: Settings) -> dict[str, dict[str, Any]]:
    """The settings as JSON-ready sections, secrets (SECRET_KEYS) replaced by REDACTED."""
    dumped = settings.model_dump(mode="json")
    for dotted in SECRET_KEYS:
        section, key = dotted.split(".")
        if dumped[section].get(key) is not None:
            dumped[section][key] = REDACTED
    return dumped


def to_toml(settings: Settings) -> str:
    """Render settings as TOML (None values are left out, as TOML has no null; secrets hidden)."""
    out: list[str] = []
    for section, values in public_dict(settings).items():
        out.append(f"[{section}]")
        for key, value in values.items():
            if value is None:
                out.append(f"# {key} = (unset)")
            elif value == REDACTED and f"{section}.{key}" in SECRET_KEYS:
                out.append(f"# {key} = (set, not shown)")
            else:
                out.append(f"{key} = {toml_value(value)}")
        out.append("")
    return "\n".join(out)


def toml_value(value: Any) -> str:
    """A Python scalar or list as a TOML value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def flatten(settings: Settings) -> dict[str, Any]:
    """`section.key -> value` for every setting (for tracking params; secrets hidden)."""
    return dotted(public_dict(settings))

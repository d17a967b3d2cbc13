"""THE checkpoint schema: what best.pt and last.pt hold, how they are written and read back.

Both files are one dict written by `torch.save` from plain data and tensors (loaded with
`weights_only=True`), atomically. The keys, format 2:

    format          2
    kind            "best" (the weights to deploy, chosen on validation) or "last" (resumable)
    model_name      a registry name (`ctscan.models.MODEL_NAMES`)
    preprocess      the PreprocessSpec dict (image_size, resize, mean, std, class_names, channels)
    class_names     the spec's class names, index order of the logits
    model_state     THE WEIGHTS TO DEPLOY, the same meaning in both files: the EMA weights when
                    train.ema is on, else the trained weights; unwrapped (no `module.`, no
                    `_orig_mod.`), on the CPU. `ctscan evaluate last.pt` scores what best.pt
                    would have had that epoch been the best.
    epoch, history, best_epoch, best_value, select_metric
    settings        the resolved settings the run used (JSON-ready dict)
    data_hash, git_commit, ctscan_version, torch_version, mlflow_run_id
    temperature     T > 0: the probabilities shown are softmax(logits / T) (engine/temperature.py),
                    fitted on valid at the end of training or by `ctscan calibrate`; 1.0 (or
                    absent): uncalibrated
    calibration     the fit's report (split, n, status, NLL / ECE / log-loss before and after),
                    or None when T was never fitted
    training        last.pt only: {model_state (the raw trained weights), ema_state, optimizer,
                    scheduler, scaler, rng (one per rank)}; None in best.pt, which cannot resume.
    members, flips  an ensemble (`ctscan ensemble`, model_name "ensemble"): members is a list of
                    {model_name, dropout, temperature, source, sha256, best_value}, flips the
                    test-time views ("hflip", "vflip"); model_state holds the ensemble module's
                    weights (`members.<k>.net.*`). None and () for one network; what the output
                    is: models/ensemble.py.

Other formats (format 1 kept the raw weights in last.pt's `model_state`) are refused. Everything
downstream reads a checkpoint through `read_checkpoint` and gets a model through `load_model`.
"""

from __future__ import annotations

import pickle
import subprocess
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

import ctscan
from ctscan.data.transforms import PreprocessSpec
from ctscan.engine.modelling import Deployable, build_model, check_model_name, load_model_state
from ctscan.engine.temperature import check_temperature, describe
from ctscan.errors import CheckpointError, DataError
from ctscan.files import RUN_FIX, atomic_write, model_file
from ctscan.files import file_sha256 as file_sha256  # where the benches and tests get it
from ctscan.jobs import critical
from ctscan.models import input_channels
from ctscan.models.ensemble import Ensemble, Member, check_flips

FORMAT_VERSION = 2
REQUIRED_KEYS = ("format", "model_name", "model_state", "preprocess", "class_names", "settings")
ENSEMBLE = "ensemble"  # model_name of an ensemble checkpoint
MEMBER_KEYS = ("model_name", "dropout", "temperature", "source", "sha256", "best_value")
_NOT_SAVED = ("spec", "source")  # saved as preprocess + class_names; where it was read from
# The fields `from_payload` takes as saved (the others it checks one by one).
_AS_SAVED = ("epoch", "history", "best_epoch", "best_value", "select_metric", "data_hash")
_AS_SAVED += ("git_commit", "ctscan_version", "torch_version", "mlflow_run_id", "training")


def git_commit() -> str | None:
    """The current git commit of the working directory, or None outside a checkout."""
    command = ["git", "rev-parse", "HEAD"]
    try:
        out = subprocess.check_output(command, text=True, timeout=5, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip() or None


@dataclass
class Checkpoint:
    """One checkpoint file, typed: see the module docstring for what each field means."""

    kind: Literal["best", "last"]
    model_name: str
    spec: PreprocessSpec
    model_state: dict[str, torch.Tensor]
    settings: dict[str, Any]
    epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int = 0
    best_value: float | None = None
    select_metric: str = "val_macro_f1"
    data_hash: str | None = None
    git_commit: str | None = None
    ctscan_version: str = ctscan.__version__
    torch_version: str = str(torch.__version__)
    mlflow_run_id: str | None = None
    temperature: float = 1.0  # softmax(logits / temperature); 1.0: uncalibrated
    calibration: dict[str, Any] | None = None  # the fit's report; None: never fitted
    training: dict[str, Any] | None = None
    members: list[dict[str, Any]] | None = None  # an ensemble's networks (see the docstring)
    flips: tuple[str, ...] = ()  # an ensemble's test-time views besides the identity
    source: Path | None = None  # where it was read from (not saved)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in the index order of the logits."""
        return self.spec.class_names

    @property
    def channels(self) -> int:
        """Input channels of the model (the gray image is repeated when 3)."""
        return input_channels(self.members[0]["model_name"] if self.members else self.model_name)

    @property
    def is_ensemble(self) -> bool:
        """Whether this file holds several networks (or test-time views) as one model."""
        return self.members is not None

    @property
    def calibration_text(self) -> str:
        """'T = 1.31 (valid, 72 images)' or 'uncalibrated': where the temperature is shown."""
        text = describe(self.temperature, self.calibration)
        if self.members is not None and self.calibration is None:
            return f"{text} on top of its members' own temperatures"
        return text

    @property
    def resumable(self) -> bool:
        """Whether this file holds the training state (last.pt) to continue the run."""
        return self.training is not None

    def to_payload(self) -> dict[str, Any]:
        """The dict `torch.save` writes (plain data and tensors only)."""
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_SAVED}
        return plain | {
            "format": FORMAT_VERSION,
            "preprocess": self.spec.to_dict(),
            "class_names": list(self.spec.class_names),
            "temperature": float(self.temperature),
            "flips": list(self.flips),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any], *, source: Path) -> Checkpoint:
        """Check and type a loaded dict; CheckpointError if it is off."""
        if missing := [k for k in REQUIRED_KEYS if k not in payload]:
            raise CheckpointError(
                f"'{source}' is not a ctscan checkpoint (missing {', '.join(missing)}).", RUN_FIX
            )
        if payload["format"] != FORMAT_VERSION:
            raise CheckpointError(
                f"checkpoint '{source}' has format {payload['format']}; this ctscan "
                f"{ctscan.__version__} reads format {FORMAT_VERSION} only.",
                "retrain with this ctscan, or use the version that wrote it (its ctscan_version).",
            )
        try:
            spec = PreprocessSpec.from_dict(payload["preprocess"])
        except DataError as exc:
            raise CheckpointError(
                f"checkpoint '{source}' has a broken preprocessing spec: {exc.message}", RUN_FIX
            ) from None
        if list(payload["class_names"]) != list(spec.class_names):
            raise CheckpointError(
                f"checkpoint '{source}' is inconsistent: class_names {payload['class_names']} "
                f"differ from its spec's {list(spec.class_names)}.",
                RUN_FIX,
            )
        state = payload["model_state"]
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise CheckpointError(f"checkpoint '{source}' holds no weights.", RUN_FIX)
        calibration = payload.get("calibration")
        if calibration is not None and not isinstance(calibration, dict):
            raise CheckpointError(
                f"checkpoint '{source}' has a broken calibration entry "
                f"({type(calibration).__name__}).",
                "calibrate it again with `ctscan calibrate CHECKPOINT`, or retrain.",
            )
        members, flips = _ensemble(payload, source)
        return cls(
            **{key: payload[key] for key in _AS_SAVED if key in payload},
            kind=payload.get("kind") or ("last" if payload.get("training") else "best"),
            model_name=ENSEMBLE if members else check_model_name(payload["model_name"], source),
            spec=spec,
            model_state=state,
            settings=dict(payload["settings"]),
            temperature=check_temperature(payload.get("temperature", 1.0), source),
            calibration=calibration,
            members=members,
            flips=flips,
            source=source,
        )


def _ensemble(
    payload: dict[str, Any], source: Path
) -> tuple[list[dict[str, Any]] | None, tuple[str, ...]]:
    """(members, flips) of an ensemble file, (None, ()) for one network; else CheckpointError."""
    members, flips = payload.get("members"), payload.get("flips") or []
    if members is None and payload["model_name"] != ENSEMBLE and not flips:
        return None, ()

    def broken(what: str) -> CheckpointError:
        return CheckpointError(
            f"checkpoint '{source}' is a broken ensemble ({what}).",
            "build it again with `ctscan ensemble MEMBER.pt ... --out FILE`.",
        )

    if payload["model_name"] != ENSEMBLE or not isinstance(members, list) or not members:
        raise broken("model_name 'ensemble' and a non-empty members list go together")
    checked = []
    for i, member in enumerate(members):
        if not isinstance(member, dict) or any(k not in member for k in MEMBER_KEYS):
            raise broken(f"member {i} lacks {', '.join(MEMBER_KEYS)}")
        check_model_name(str(member["model_name"]), source)
        check_temperature(member["temperature"], source)
        checked.append(dict(member))
    if len({input_channels(m["model_name"]) for m in checked}) != 1:
        raise broken("members take different input channels")
    try:
        return checked, check_flips(list(flips))
    except (TypeError, ValueError) as exc:
        raise broken(str(exc)) from None


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` to `path` atomically.

    A stop waits for the write: torch.save's zip writer turns an exception raised in its write
    callback (where a signal handler may run) into a RuntimeError, a failed write, not a stop.
    """
    with critical():
        return atomic_write(Path(path), lambda fh: torch.save(checkpoint.to_payload(), fh))


def read_checkpoint(path: Path | str) -> Checkpoint:
    """Read a ctscan checkpoint safely; anything else is refused with one clear error."""
    path = model_file(path)
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is broken
        raise CheckpointError(
            f"checkpoint '{path}' is not a PyTorch checkpoint file, or it is truncated.",
            "re-copy the file or use another checkpoint (last.pt / best.pt).",
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines() or [type(exc).__name__]
        reason = next((ln.strip() for ln in lines if "global" in ln.lower()), lines[0])
        raise CheckpointError(
            f"checkpoint '{path}' was refused: it holds objects other than tensors and plain data "
            f"(nothing from it was executed; {reason})",
            "only load checkpoints written by `ctscan train`.",
        ) from None
    except Exception as exc:  # any other failure to parse: a broken or foreign file
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"checkpoint '{path}' is unreadable or truncated ({first}).",
            "re-copy the file or use another checkpoint (last.pt / best.pt).",
        ) from None
    if not isinstance(payload, dict):
        raise CheckpointError(
            f"'{path}' is not a ctscan checkpoint (it holds a {type(payload).__name__}).", RUN_FIX
        )
    return Checkpoint.from_payload(payload, source=path)


def build_network(checkpoint: Checkpoint) -> nn.Module:
    """The checkpoint's model with its deploy weights, on the CPU, in eval mode."""
    size, classes = checkpoint.spec.image_size, len(checkpoint.class_names)

    def network(name: str, dropout: Any) -> nn.Module:
        return build_model(name, num_classes=classes, image_size=size, dropout=float(dropout))

    if checkpoint.members is not None:
        members = [
            Member(network(m["model_name"], m["dropout"]), m["model_name"], float(m["temperature"]))
            for m in checkpoint.members
        ]
        model: nn.Module = Ensemble(members, checkpoint.flips)
    else:
        dropout = checkpoint.settings.get("model", {}).get("dropout", 0.2)
        model = network(checkpoint.model_name, dropout)
    load_model_state(model, checkpoint.model_state, source=checkpoint.source or "checkpoint")
    return model.eval()


@dataclass
class LoadedModel:
    """A model ready for inference, with what it needs to be fed and read."""

    model: nn.Module  # eval mode: model_input's batch -> raw logits (not / T)
    checkpoint: Checkpoint

    @property
    def spec(self) -> PreprocessSpec:
        return self.checkpoint.spec

    @property
    def channels(self) -> int:
        return self.checkpoint.channels

    @property
    def temperature(self) -> float:
        return self.checkpoint.temperature

    def deployable(self) -> Deployable:
        """The same weights behind a uint8-in, calibrated-logits-out module (MLflow, exports)."""
        return Deployable(self.model, self.spec, self.channels, self.temperature).eval()


def load_model(
    source: Checkpoint | Path | str,
    *,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> LoadedModel:
    """THE way to get a model from a checkpoint (file or already read): model + spec + channels."""
    checkpoint = source if isinstance(source, Checkpoint) else read_checkpoint(source)
    model = build_network(checkpoint).to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return LoadedModel(model=model, checkpoint=checkpoint)

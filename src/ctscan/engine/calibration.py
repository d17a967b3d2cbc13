"""Temperature scaling: one T > 0 fitted on validation logits, so softmax(logits / T) is calibrated.

    fit = fit_temperature(val_logits, val_labels)      # pure: numpy float64, deterministic
    fit.temperature                                     # 1.0 when nothing could be fitted

T minimises the mean negative log-likelihood of the validation labels under softmax(logits / T).
That NLL is convex in 1/T, so a golden-section search over log T in [T_MIN, T_MAX] finds the
minimum without a learning rate or a random start. Dividing by T > 0 never changes the argmax:
accuracy and macro-F1 are the same before and after.

When the fit cannot say anything, T stays 1.0 (uncalibrated) and `status` says why:
  empty        the validation split holds no images;
  separated    every validation image is already right: the NLL keeps falling as T -> 0 (every
               answer at 100 %), so there is no optimum to find, only a bound; sharpening a model
               on no observed error is what calibration is meant to prevent.
A minimum outside [T_MIN, T_MAX] is clamped to the bound (`status` "at_bound", said in the note);
fewer than FEW_IMAGES validation images get a note that T is uncertain.

Where T lives: `Checkpoint.temperature` (+ `calibration`, this fit's report), fitted at the end
of training on best.pt (`train.calibrate`) or later by `ctscan calibrate`; `Deployable` divides
its logits by it, so the ONNX / .pt2 exports and the MLflow model carry it; the checkpoint
predictor and `ctscan evaluate` apply it. The test split is never read here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

T_MIN, T_MAX = 0.05, 20.0
FEW_IMAGES = 30  # below this many validation images the note says T is uncertain
FIT_SPLIT = "valid"
_GOLDEN_STEPS = 80  # shrinks the log T interval by 0.618**80 ~ 2e-17: far below any use

Status = Literal["fitted", "at_bound", "separated", "empty"]


def _as_logits(logits: Any) -> np.ndarray:
    array = np.asarray(logits.detach().cpu() if hasattr(logits, "detach") else logits)
    array = array.astype(np.float64)
    if array.ndim != 2 or array.shape[1] < 1:
        raise ValueError(f"logits must have shape (N, C), got {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValueError("logits hold NaN or infinite values.")
    return array


def _as_labels(labels: Any, n: int, num_classes: int) -> np.ndarray:
    array = np.asarray(labels.cpu() if hasattr(labels, "cpu") else labels).astype(np.int64)
    if array.shape != (n,):
        raise ValueError(f"labels must have shape ({n},) to match the logits, got {array.shape}.")
    if n and (array.min() < 0 or array.max() >= num_classes):
        raise ValueError(f"labels must be class indices in [0, {num_classes - 1}].")
    return array


def nll(logits: Any, labels: Any, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of `labels` under softmax(logits / temperature), float64."""
    z = _as_logits(logits) / float(temperature)
    y = _as_labels(labels, len(z), z.shape[1])
    if not len(z):
        return float("nan")
    top = z.max(axis=1, keepdims=True)
    log_norm = top[:, 0] + np.log(np.exp(z - top).sum(axis=1))
    return float((log_norm - z[np.arange(len(y)), y]).mean())


@dataclass(frozen=True)
class TemperatureFit:
    """The result of `fit_temperature`: T, how it was found, the NLL before and after."""

    temperature: float
    status: Status
    n: int
    nll_before: float | None = None  # at T = 1
    nll_after: float | None = None  # at the returned T
    note: str = ""

    @property
    def fitted(self) -> bool:
        """Whether T came from the data (possibly clamped), not a fallback to 1."""
        return self.status in ("fitted", "at_bound")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


def fit_temperature(
    logits: Any, labels: Any, *, bounds: tuple[float, float] = (T_MIN, T_MAX)
) -> TemperatureFit:
    """The T in `bounds` that minimises the NLL of `labels` under softmax(logits / T).

    `logits` (N, C) and `labels` (N,) as numpy arrays or tensors; everything runs in float64
    and the search is deterministic. See the module docstring for the degenerate cases.
    """
    low, high = float(bounds[0]), float(bounds[1])
    if not 0.0 < low < 1.0 < high:
        raise ValueError(f"bounds must satisfy 0 < low < 1 < high, got {bounds}.")
    z = _as_logits(logits)
    y = _as_labels(labels, len(z), z.shape[1])
    n = len(y)
    if n == 0:
        return TemperatureFit(
            1.0, "empty", 0, note="the validation split is empty: T kept at 1 (uncalibrated)"
        )
    before = nll(z, y)
    if bool((z.argmax(axis=1) == y).all()):
        return TemperatureFit(
            1.0,
            "separated",
            n,
            before,
            before,
            note=f"all {n} validation images are already right, so the likelihood has no "
            "optimum (it keeps rising as T -> 0): T kept at 1 (uncalibrated)",
        )
    # Golden-section search over u = log T (NLL is convex in 1/T, so unimodal in u).
    a, b = math.log(low), math.log(high)
    ratio = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(z, y, math.exp(c)), nll(z, y, math.exp(d))
    for _ in range(_GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(z, y, math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(z, y, math.exp(d))
    u = (a + b) / 2.0
    temperature = min(max(math.exp(u), low), high)
    notes = []
    status: Status = "fitted"
    edge = 1e-6
    if u <= math.log(low) + edge or u >= math.log(high) - edge:
        status = "at_bound"
        temperature = low if u <= math.log(low) + edge else high
        notes.append(
            f"the NLL minimum lies at or beyond the bound, T clamped to {temperature:g} "
            f"(allowed {low:g}..{high:g})"
        )
    after = nll(z, y, temperature)
    if not after < before:  # flat (e.g. constant logits): T changes nothing, keep 1
        temperature, after, status, notes = 1.0, before, "fitted", []
    if n < FEW_IMAGES:
        notes.append(f"only {n} validation images: T is uncertain")
    return TemperatureFit(temperature, status, n, before, after, note="; ".join(notes))


def check_temperature(value: Any, source: Path | str) -> float:
    """A checkpoint's or model file's temperature as a float > 0, else a CheckpointError."""
    from ctscan.errors import CheckpointError

    try:
        temperature = float(value)
    except (TypeError, ValueError):
        temperature = float("nan")
    if isinstance(value, bool) or not math.isfinite(temperature) or temperature <= 0.0:
        raise CheckpointError(
            f"'{source}' holds the temperature {value!r}; it must be a finite number > 0.",
            "calibrate it again with `ctscan calibrate CHECKPOINT`, or retrain.",
        )
    return temperature


_UNFITTED = {
    "separated": "validation perfectly separated: nothing to fit",
    "empty": "no validation images",
}


def describe(temperature: float, calibration: dict[str, Any] | None = None) -> str:
    """One phrase for where a model's temperature is shown: 'T = 1.31 (valid, 72 images)'."""
    if calibration is None and temperature == 1.0:
        return "uncalibrated"
    status = str((calibration or {}).get("status", "fitted"))
    if status not in ("fitted", "at_bound"):
        return f"uncalibrated ({_UNFITTED.get(status, status)})"
    where = ""
    if calibration is not None:
        bound = ", clamped at the bound" if status == "at_bound" else ""
        split, n = calibration.get("split", FIT_SPLIT), calibration.get("n", "?")
        where = f" ({split}, {n} images{bound})"
    return f"T = {temperature:.4g}{where}"


# ---- a checkpoint -------------------------------------------------------------------------


def apply_temperature(logits: Any, temperature: float) -> Any:
    """logits / T (a tensor stays a tensor); T = 1 returns the logits untouched."""
    return logits if temperature == 1.0 else logits / temperature


def validation_logits(checkpoint: Any, store: Any, rt: Any) -> tuple[Any, np.ndarray]:
    """The checkpoint's raw (uncalibrated) logits on the store's validation split, and labels."""
    from ctscan.engine.evaluate import raw_logits, require_same_spec

    require_same_spec(checkpoint, store)
    data = store.split(FIT_SPLIT)  # the one split read: never test
    return raw_logits(checkpoint, data.images, rt).cpu(), data.labels.cpu().numpy()


def calibration_report(
    logits: np.ndarray, labels: np.ndarray, class_names: list[str], split: str
) -> dict[str, Any]:
    """Fit T on held-out `logits` (from `split`): the fit, and ECE / log-loss before and after.

    The report every calibrated checkpoint keeps (`Checkpoint.calibration`); `temperature` is
    the T to store. With no images the fit is T = 1 and no metrics are added.
    """
    from ctscan.engine.metrics import classification_report, probabilities

    fit = fit_temperature(logits, labels)
    report: dict[str, Any] = {"method": "temperature", "split": split, **fit.to_dict()}
    report["bounds"] = [T_MIN, T_MAX]
    if fit.n:
        for key, temperature in (("before", 1.0), ("after", fit.temperature)):
            probs = probabilities(apply_temperature(logits, temperature))
            metrics = classification_report(labels, probs, list(class_names))
            report[f"ece_{key}"] = metrics["ece"]
            report[f"ece_floor_{key}"] = metrics["ece_floor"]  # a calibrated model's ECE here
            report[f"log_loss_{key}"] = metrics["log_loss"]
    return report


def fit_checkpoint(checkpoint: Any, store: Any, rt: Any) -> tuple[Any, dict[str, Any]]:
    """Fit T on the validation split for `checkpoint`'s deploy weights.

    Returns (the checkpoint with `temperature` and `calibration` set, the calibration report:
    the fit plus the validation ECE and log-loss before and after). Any T the checkpoint held
    before is ignored: the fit always starts from the raw logits.
    """
    logits, labels = validation_logits(checkpoint, store, rt)
    report = calibration_report(logits, labels, checkpoint.class_names, FIT_SPLIT)
    calibrated = dataclasses.replace(
        checkpoint, temperature=report["temperature"], calibration=report
    )
    return calibrated, report


def train_confidence(checkpoint: Any, store: Any, rt: Any) -> dict[str, Any]:
    """reference_confidence.json's content: the calibrated max-softmax on every train image."""
    from ctscan.data.reference import confidence_reference
    from ctscan.engine.evaluate import raw_logits
    from ctscan.engine.metrics import probabilities

    logits = raw_logits(checkpoint, store.split("train").images, rt)
    probs = probabilities(apply_temperature(logits, checkpoint.temperature))
    return confidence_reference(probs.max(axis=1), temperature=checkpoint.temperature)


# ---- `ctscan calibrate` -------------------------------------------------------------------


@dataclass
class CalibrationResult:
    """What `run_calibrate` did: the checkpoint written, its old and new T, the report."""

    source: Path
    checkpoint: Path
    previous_temperature: float
    report: dict[str, Any]
    reference: Path | None = None  # reference_confidence.json rewritten for the new T
    warnings: list[str] = field(default_factory=list)

    @property
    def temperature(self) -> float:
        """The temperature written."""
        return float(self.report["temperature"])

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "source": str(self.source),
            "checkpoint": str(self.checkpoint),
            "previous_temperature": self.previous_temperature,
            "temperature": self.temperature,
            "calibration": self.report,
            "reference_confidence": str(self.reference) if self.reference else None,
            "warnings": self.warnings,
        }


def _output_path(source: Path, out: Path | None) -> Path:
    from ctscan.files import checkpoint_file_problem, ensure_dir

    target = source if out is None else Path(out)
    problem = checkpoint_file_problem(target, example=source.name)
    if problem is not None:
        raise problem
    return ensure_dir(target.parent, what="folder of the --out checkpoint") / target.name


def run_calibrate(settings: Any, checkpoint: Path | str, *, out: Path | None = None) -> Any:
    """The `ctscan calibrate` command: fit T on the store's validation split, write the file.

    The checkpoint is rewritten in place (atomically) unless `out` names another .pt file; its
    training state, if any, is kept. reference_confidence.json beside the written file is
    rewritten for the new T (the server's drift reference), except when `out` is another file
    in the source's own folder: the reference there belongs to the source.
    """
    from ctscan.data.reference import CONFIDENCE_FILE
    from ctscan.data.store import open_model_store
    from ctscan.engine.checkpoint import read_checkpoint, save_checkpoint
    from ctscan.engine.runtime import resolve_runtime
    from ctscan.errors import CtscanError
    from ctscan.files import atomic_write, folder_lock

    rt = resolve_runtime(settings.train)
    if rt.distributed:
        raise CtscanError("calibrate runs in one process.", "run it without torchrun.")
    source = Path(checkpoint)
    ckpt = read_checkpoint(source)
    target = _output_path(source, out)
    store = open_model_store(settings, ckpt)
    with folder_lock(target.parent, what="checkpoint folder"):
        calibrated, report = fit_checkpoint(ckpt, store, rt)
        save_checkpoint(target, calibrated)
        reference = None
        same_folder = target.parent.resolve() == source.parent.resolve()
        if target.resolve() == source.resolve() or not same_folder:
            body = json.dumps(train_confidence(calibrated, store, rt)).encode()
            reference = atomic_write(target.parent / CONFIDENCE_FILE, lambda fh: fh.write(body))
    warnings = [store.raw_warning] if store.raw_warning else []
    if report.get("note"):
        warnings.append(str(report["note"]))
    return CalibrationResult(
        source=source,
        checkpoint=target,
        previous_temperature=ckpt.temperature,
        report=report,
        reference=reference,
        warnings=warnings,
    )

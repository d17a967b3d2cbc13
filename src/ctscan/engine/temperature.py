"""Temperature scaling: one T > 0 fitted on validation logits, so softmax(logits / T) is calibrated.

T minimises the mean NLL of the validation labels under softmax(logits / T): scipy's bounded Brent
search over log T in [T_MIN, T_MAX] (the NLL is convex in 1/T). Dividing by T > 0 never changes the
argmax: accuracy and macro-F1 stay. Where the fit cannot say anything, T stays 1.0 and `status`
says why: `empty` (no validation images) or `separated` (every validation image already right:
the NLL keeps falling as T -> 0, so there is no optimum, only a bound; sharpening a model on no
observed error is what calibration is meant to prevent). A minimum outside the bounds is clamped
(`at_bound`). The test split is never read here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from ctscan.errors import CheckpointError

T_MIN, T_MAX = 0.05, 20.0
FEW_IMAGES = 30  # below this many validation images the note says T is uncertain
FIT_SPLIT = "valid"

Status = Literal["fitted", "at_bound", "separated", "empty"]


def _as_logits(logits: Any) -> np.ndarray:
    array = np.asarray(logits.detach().cpu() if hasattr(logits, "detach") else logits, np.float64)
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

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return dataclasses.asdict(self)


def fit_temperature(logits: Any, labels: Any) -> TemperatureFit:
    """The T in [T_MIN, T_MAX] minimising the NLL of `labels` (N,) under softmax(logits / T)."""
    from scipy.optimize import minimize_scalar

    z = _as_logits(logits)
    y = _as_labels(labels, len(z), z.shape[1])
    n = len(y)
    if n == 0:
        return TemperatureFit(
            1.0, "empty", 0, note="the validation split is empty: T kept at 1 (uncalibrated)"
        )
    before = nll(z, y)
    if bool((z.argmax(axis=1) == y).all()):
        note = (
            f"all {n} validation images are already right, so the likelihood has no optimum "
            "(it keeps rising as T -> 0): T kept at 1 (uncalibrated)"
        )
        return TemperatureFit(1.0, "separated", n, before, before, note=note)
    edges = (math.log(T_MIN), math.log(T_MAX))  # searched over log T
    fit = minimize_scalar(
        lambda log_t: nll(z, y, math.exp(log_t)),
        bounds=edges,
        method="bounded",
        options={"xatol": 1e-10},
    )
    temperature, notes, status = math.exp(fit.x), [], "fitted"
    if min(abs(fit.x - edge) for edge in edges) <= 1e-6:
        status, temperature = "at_bound", T_MIN if fit.x - edges[0] <= 1e-6 else T_MAX
        notes.append(
            f"the NLL minimum lies at or beyond the bound, T clamped to {temperature:g} "
            f"(allowed {T_MIN:g}..{T_MAX:g})"
        )
    after = nll(z, y, temperature)
    if not after < before:  # flat (e.g. constant logits): T changes nothing, keep 1
        temperature, after, status, notes = 1.0, before, "fitted", []
    if n < FEW_IMAGES:
        notes.append(f"only {n} validation images: T is uncertain")
    return TemperatureFit(temperature, status, n, before, after, note="; ".join(notes))


def check_temperature(value: Any, source: Path | str) -> float:
    """A checkpoint's or model file's temperature as a float > 0, else a CheckpointError."""
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


def apply_temperature(logits: Any, temperature: float) -> Any:
    """logits / T (a tensor stays a tensor); T = 1 returns the logits untouched."""
    return logits if temperature == 1.0 else logits / temperature

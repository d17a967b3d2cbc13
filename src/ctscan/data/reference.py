"""The training reference for drift monitoring: per-image statistics of the train split.

Each image is described by FEATURES, computed on the (S, S) uint8 gray image the model sees
(after decode + resize, before normalisation), in 0..255 units:

    mean, std           intensity mean and standard deviation
    p05, p50, p95       intensity percentiles (inverted CDF: the smallest value v with
                        P(pixel <= v) >= q, so always a pixel value; numpy's "inverted_cdf")
    black_fraction      share of pixels <= BLACK_LEVEL (5)
    saturated_fraction  share of pixels >= SATURATED_LEVEL (250)
    entropy             Shannon entropy of the 256-bin histogram, in bits (0..8)
    edge_energy         mean absolute difference between neighbouring pixels (sharpness/noise)

`preprocess` stores a sample of these values (a two-sample test needs samples) as the store's
`reference.json`; `train` writes the model's max-softmax on the train images (with its T and a
copy of reference.json) as `reference_confidence.json` beside the checkpoint.

reference.json: {"format": 1, "features": [names], "samples": {name: [float, ...]}, "n": number
of sampled images, "n_images": images in the split, "split": "train", "image_size": S, "seed",
"black_level", "saturated_level"}.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ctscan.errors import DataError

REFERENCE_FILE = "reference.json"
CONFIDENCE_FILE = "reference_confidence.json"
REFERENCE_FORMAT = 1
FEATURES: tuple[str, ...] = (
    "mean",
    "std",
    "p05",
    "p50",
    "p95",
    "black_fraction",
    "saturated_fraction",
    "entropy",
    "edge_energy",
)
BLACK_LEVEL = 5
SATURATED_LEVEL = 250
PERCENTILES = {"p05": 0.05, "p50": 0.50, "p95": 0.95}
MAX_SAMPLES = 613  # the Kaggle train split: all of it by default
_CHUNK_PIXELS = 1 << 22  # images per chunk: ~4 M pixels (a 32 MB int64 histogram index)
_FIX = "run `ctscan preprocess` to rebuild the processed store (it writes reference.json)."


def _gray_stack(images: Any) -> np.ndarray:
    """(N, 1, S, S) or (N, S, S) uint8 images as an (N, S, S) array."""
    images = np.asarray(images)
    if images.ndim == 4 and images.shape[1] == 1:
        images = images[:, 0]
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"expected uint8 images (N, 1, S, S) or (N, S, S), got {images.dtype} {images.shape}"
        )
    return images


def features_matrix(images: np.ndarray) -> np.ndarray:
    """FEATURES of each image as a float64 (N, F) matrix; images (N, 1, S, S) or (N, S, S) uint8."""
    images = _gray_stack(images)
    n, height, width = images.shape
    if n and not height * width:
        raise ValueError(f"images have no pixels: {images.shape}")
    step = max(1, _CHUNK_PIXELS // max(1, height * width))
    chunks = [_chunk_features(images[start : start + step]) for start in range(0, n, step)]
    return np.concatenate(chunks) if chunks else np.empty((0, len(FEATURES)))


def _chunk_features(images: np.ndarray) -> np.ndarray:
    """FEATURES of a chunk of (n, H, W) uint8 images: from one histogram per image + gradients."""
    n, height, width = images.shape
    pixels = height * width
    flat = images.reshape(n, pixels)
    offsets = np.arange(n, dtype=np.int64)[:, None] * 256
    hist = np.bincount((flat + offsets).ravel(), minlength=n * 256).reshape(n, 256)
    p = hist / pixels  # (n, 256) share of pixels per value
    values = np.arange(256, dtype=np.float64)
    mean = (p * values).sum(axis=1)  # row sums, not a matmul: the same bits in any chunk size
    var = (p * (values - mean[:, None]) ** 2).sum(axis=1)
    cdf = np.cumsum(hist, axis=1)
    cols: dict[str, np.ndarray] = {"mean": mean, "std": np.sqrt(var)}
    for name, q in PERCENTILES.items():
        # inverted CDF: the first value whose cumulative count reaches q * pixels
        cols[name] = (cdf < q * pixels).sum(axis=1).astype(np.float64)
    cols["black_fraction"] = p[:, : BLACK_LEVEL + 1].sum(axis=1)
    cols["saturated_fraction"] = p[:, SATURATED_LEVEL:].sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        logs = np.where(p > 0, np.log2(np.where(p > 0, p, 1.0)), 0.0)
    cols["entropy"] = np.maximum(-(p * logs).sum(axis=1), 0.0)
    signed = images.astype(np.int16)
    dx = np.abs(np.diff(signed, axis=2)).reshape(n, -1).sum(axis=1) if width > 1 else 0
    dy = np.abs(np.diff(signed, axis=1)).reshape(n, -1).sum(axis=1) if height > 1 else 0
    pairs = height * (width - 1) + width * (height - 1)
    cols["edge_energy"] = np.asarray(dx + dy, dtype=np.float64) / pairs if pairs else np.zeros(n)
    return np.stack([cols[name] for name in FEATURES], axis=1)


def build_reference(
    train_images: np.ndarray, *, max_samples: int = MAX_SAMPLES, seed: int = 0
) -> dict[str, Any]:
    """The reference dict of at most `max_samples` train images (uint8), drawn from `seed`."""
    images = _gray_stack(train_images)
    n_images = len(images)
    if n_images == 0:
        raise DataError("cannot build the drift reference: the train split has no images.")
    if n_images > max_samples:
        chosen = np.sort(np.random.default_rng(seed).choice(n_images, max_samples, replace=False))
        images = images[chosen]
    matrix = features_matrix(images)
    return {
        "format": REFERENCE_FORMAT,
        "features": list(FEATURES),
        "samples": {name: matrix[:, i].tolist() for i, name in enumerate(FEATURES)},
        "n": len(images),
        "n_images": n_images,
        "split": "train",
        "image_size": int(images.shape[1]),
        "seed": seed,
        "black_level": BLACK_LEVEL,
        "saturated_level": SATURATED_LEVEL,
    }


def check_reference(reference: Any, *, source: str = "the drift reference") -> dict[str, Any]:
    """Return `reference` if it is a valid reference dict; else a DataError naming the problem."""

    def bad(what: str) -> DataError:
        return DataError(f"{source} is broken: {what}.", _FIX)

    if not isinstance(reference, Mapping):
        raise bad(f"expected a JSON object, got {type(reference).__name__}")
    if reference.get("format") != REFERENCE_FORMAT:
        raise bad(f"format {reference.get('format')!r}, this ctscan reads {REFERENCE_FORMAT}")
    for key in ("features", "samples", "n", "image_size"):
        if key not in reference:
            raise bad(f"'{key}' is missing")
    features, samples, n = reference["features"], reference["samples"], reference["n"]
    if not isinstance(features, list) or not features:
        raise bad("'features' must be a non-empty list of names")
    if unknown := [f for f in features if f not in FEATURES]:
        raise bad(f"unknown feature(s) {unknown}; known: {', '.join(FEATURES)}")
    if len(set(features)) != len(features):
        raise bad("'features' lists a name twice")
    for key in ("n", "image_size"):
        if not isinstance(value := reference[key], int) or isinstance(value, bool) or value < 1:
            raise bad(f"'{key}' must be a positive integer, got {value!r}")
    if not isinstance(samples, Mapping) or set(samples) != set(features):
        raise bad("'samples' must hold one list per name in 'features'")
    for name in features:
        values = samples[name]
        if not isinstance(values, list) or len(values) != n:
            raise bad(f"samples of '{name}' must be a list of n={n} numbers")
        if not all(_finite_number(v) for v in values):
            raise bad(f"samples of '{name}' hold a value that is not a finite number")
    return dict(reference)


def load_reference(path: Path | str) -> dict[str, Any]:
    """Read and check a reference.json; a DataError says what is missing or broken."""
    path = Path(path)
    try:
        reference = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"no drift reference at '{path}'.", _FIX) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read the drift reference '{path}': {exc}.", _FIX) from None
    return check_reference(reference, source=f"the drift reference '{path}'")


def confidence_reference(
    confidence: Sequence[float] | np.ndarray,
    *,
    temperature: float = 1.0,
    features: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """reference_confidence.json: the model's max-softmax per train image at `temperature`."""
    values = [float(v) for v in np.asarray(confidence, dtype=np.float64).reshape(-1)]
    saved = {"confidence": values, "n": len(values), "split": "train", "temperature": temperature}
    return saved if features is None else {**saved, "features": dict(features)}


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

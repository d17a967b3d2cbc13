"""Classification metrics: confusion matrix, F1, ROC AUC, calibration, log loss.

- precision, recall and F1 are scikit-learn's with ``zero_division=0``; ``macro_f1`` averages F1
  over the classes that occur in ``y_true`` or ``y_pred``, ``weighted_f1`` weights by support,
  ``balanced_accuracy`` is the mean recall over the classes in ``y_true``;
- ROC AUC is one-vs-rest per class (Mann-Whitney U from average ranks, ties count half); a class
  without positives or negatives gets ``None`` and is left out of ``macro_roc_auc``;
- ``ece`` is the top-label expected calibration error over ``n_bins`` equal-width confidence bins
  ``(lower, upper]`` (the first bin also holds 0.0);
- ``ece_floor`` is what ``ece`` reads for a perfectly calibrated model with the same confidences
  on as many images (each prediction right with probability its confidence, ``FLOOR_DRAWS`` draws,
  fixed seed): its median and 95th percentile. ECE is biased upwards on a finite set, so an
  ``ece`` below the floor's p95 cannot be told apart from perfect calibration here;
- ``ece_debiased`` is Kumar et al.'s (2019) debiased squared top-label calibration error over
  ``n_bins`` equal-mass bins (at most N // 2, so each holds two):
  ``sum_b n_b / N * ((acc_b - conf_b) ** 2 - acc_b * (1 - acc_b) / (n_b - 1))``, which averages 0
  for a calibrated model, reported as its signed square root. ``ci95`` is a parametric bootstrap
  (``BOOTSTRAP_RESAMPLES``, fixed seed) that keeps the images and their bins and redraws which are
  right, each with probability its confidence plus its bin's observed gap: the estimate minus the
  97.5 and 2.5 percentiles of the resamples' error about that world's true value (widened to hold
  the estimate). On synthetic sets it holds the true value 94-100 % of the time. Ties in
  confidence are split between bins in a fixed random order, so the images' order changes
  nothing. Judged against ``ECE_TARGET``: interval below it, met; above it, missed; else unknown;
- ``log_loss`` is the mean negative log of the true class's probability, clipped at 1e-12.

Bad shapes or values raise ``ValueError`` naming what was received: these inputs come from the
model and the data store, so a mismatch is a bug in the caller, not a user mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

PROB_CLIP = 1e-12
ROW_SUM_ATOL = 1e-3
FLOOR_DRAWS = 1000
FLOOR_SEED = 0
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
ECE_TARGET = 0.03  # the project's calibration target (docs/calibration.md)


def _labels(values: Any, name: str, num_classes: int) -> np.ndarray:
    """Return `values` as a 1-D int64 array of class indices in [0, num_classes)."""
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {array.shape}.")
    if array.size and not (
        np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}.")
    array = array.astype(np.int64, copy=False)
    if array.size and (array.min() < 0 or array.max() >= num_classes):
        bad = array[(array < 0) | (array >= num_classes)][0]
        raise ValueError(
            f"{name} holds class index {int(bad)}, outside [0, {num_classes - 1}] "
            f"for {num_classes} classes."
        )
    return array


def _probabilities(probs: Any, n: int, num_classes: int) -> np.ndarray:
    """Return `probs` as a float64 (N, C) array whose rows are probability vectors, else raise."""
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2 or array.shape != (n, num_classes):
        raise ValueError(
            f"probs must have shape (N, C) = ({n}, {num_classes}) to match y_true and the "
            f"class names, got {array.shape}."
        )
    if not np.all(np.isfinite(array)):
        raise ValueError("probs holds NaN or infinite values.")
    if array.min() < -ROW_SUM_ATOL or array.max() > 1 + ROW_SUM_ATOL:
        raise ValueError(
            f"probs must lie in [0, 1], got values in [{array.min():.4g}, {array.max():.4g}]; "
            "pass softmax outputs, not logits."
        )
    sums = array.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > ROW_SUM_ATOL:
        raise ValueError(
            f"each row of probs must sum to 1, row {worst} sums to {sums[worst]:.6g}; "
            "pass softmax outputs, not logits."
        )
    return array


def probabilities(logits: Any) -> np.ndarray:
    """Class probabilities (N, C) float64 from logits (an array or a tensor): softmax in float32.

    Every path (evaluate, calibration, predict, serve) turns logits into probabilities here, in
    numpy, so that an ONNX-only `ctscan predict` never imports torch.
    """
    if hasattr(logits, "detach"):  # a torch tensor, on any device
        logits = logits.detach().cpu().numpy()
    z = np.asarray(logits, dtype=np.float32)
    if z.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {z.shape}.")
    e = np.exp(z - z.max(axis=1, keepdims=True), dtype=np.float32)
    return (e / e.sum(axis=1, keepdims=True, dtype=np.float32)).astype(np.float64)


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Return the (C, C) int64 confusion matrix: rows are true classes, columns predicted ones."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int | np.integer):
        raise ValueError(f"num_classes must be an int, got {num_classes!r}.")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")
    true = _labels(y_true, "y_true", num_classes)
    pred = _labels(y_pred, "y_pred", num_classes)
    if true.shape != pred.shape:
        raise ValueError(
            f"y_true and y_pred must have the same length, got {true.size} and {pred.size}."
        )
    flat = np.bincount(true * num_classes + pred, minlength=int(num_classes) ** 2)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _scores(true: np.ndarray, pred: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Per-class precision, recall, F1, support (arrays) and the summary figures; scikit-learn is
    imported here, as `ctscan predict` imports this module and never needs it."""
    from sklearn.metrics import precision_recall_fscore_support

    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=range(num_classes), zero_division=0
    )
    occurring = (support > 0) | (np.bincount(pred, minlength=num_classes) > 0)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "accuracy": float(np.mean(true == pred)),
        "balanced_accuracy": float(recall[support > 0].mean()),
        "macro_f1": float(f1[occurring].mean()),
        "weighted_f1": float(f1 @ support / support.sum()),
    }


SUMMARY = ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1")


def quick_metrics(y_true: Any, y_pred: Any, num_classes: int) -> dict[str, float]:
    """Return accuracy and macro F1 of hard predictions (the same numbers as the report)."""
    if confusion_matrix(y_true, y_pred, num_classes).sum() == 0:  # checks the labels too
        raise ValueError("cannot compute metrics of an empty set (y_true has no samples).")
    scores = _scores(_labels(y_true, "y_true", num_classes), np.asarray(y_pred), num_classes)
    return {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"]}


def binary_roc_auc(is_positive: Any, scores: Any) -> float | None:
    """Return the ROC AUC of `scores` for the boolean labels (ties count half), or None without
    both label kinds."""
    positive = np.asarray(is_positive, dtype=bool)
    values = np.asarray(scores, dtype=np.float64)
    if positive.ndim != 1 or positive.shape != values.shape:
        raise ValueError(
            f"is_positive and scores must be 1-D of the same length, got shapes "
            f"{positive.shape} and {values.shape}."
        )
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    from scipy.stats import rankdata  # Mann-Whitney U from average ranks

    return (float(rankdata(values)[positive].sum()) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _confidence_bins(confidence: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """The bin edges and each confidence's bin: bin i is (edges[i], edges[i + 1]]; 0.0 goes to
    the first bin and 1.0 to the last."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return edges, np.searchsorted(edges[1:-1], confidence, side="left")


def _reliability(
    y_true: np.ndarray, probs: np.ndarray, n_bins: int
) -> tuple[float, list[dict[str, Any]]]:
    """Return the top-label ECE and, per equal-width confidence bin, its counts and averages."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges, bins = _confidence_bins(confidence, n_bins)
    counts = np.bincount(bins, minlength=n_bins)
    confidence_sums = np.bincount(bins, weights=confidence, minlength=n_bins)
    correct_sums = np.bincount(bins, weights=correct, minlength=n_bins)
    rows = [
        {
            "lower": float(edges[i]),
            "upper": float(edges[i + 1]),
            "count": int(counts[i]),
            "mean_confidence": float(confidence_sums[i] / counts[i]) if counts[i] else None,
            "accuracy": float(correct_sums[i] / counts[i]) if counts[i] else None,
        }
        for i in range(n_bins)
    ]
    filled = [r for r in rows if r["count"]]  # in bin order, as the sum always ran
    ece = sum(r["count"] / y_true.size * abs(r["accuracy"] - r["mean_confidence"]) for r in filled)
    return float(ece), rows


def ece_floor(probs: np.ndarray, n_bins: int) -> dict[str, float]:
    """ECE of a perfectly calibrated model with these confidences (module docstring)."""
    confidence = probs.max(axis=1)
    _, bins = _confidence_bins(confidence, n_bins)  # the bins of `ece`
    members = np.zeros((confidence.size, n_bins))
    members[np.arange(confidence.size), bins] = 1.0  # (N, bins) one-hot bin of each image
    rng = np.random.default_rng(FLOOR_SEED)
    expected = confidence @ members  # (bins,) sum of confidences per bin
    ece = np.empty(FLOOR_DRAWS)
    for start in range(0, FLOOR_DRAWS, 100):  # 100 draws at a time: (100, N) in memory
        draws = rng.random((min(100, FLOOR_DRAWS - start), confidence.size))
        right = (draws < confidence).astype(np.float64)  # right with probability = confidence
        gap = np.abs(right @ members - expected)  # (draws, bins): |sum right - sum confidence|
        ece[start : start + len(draws)] = gap.sum(axis=1) / confidence.size
    return {"median": float(np.median(ece)), "p95": float(np.percentile(ece, 95))}


def equal_mass_counts(n: int, bins: int) -> np.ndarray:
    """How many of `n` images sorted by confidence each of `bins` equal-mass bins holds."""
    return np.diff(np.arange(bins + 1) * n // bins)


def _debiased_squared_error(
    mean_confidence: np.ndarray, correct: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Kumar et al.'s debiased squared calibration error of each row of `correct` (R, N), its
    images sorted by confidence into bins of `counts` whose mean confidences are given -> (R,)."""
    starts = np.cumsum(counts) - counts
    accuracy = np.add.reduceat(correct, starts, axis=1) / counts  # (R, bins)
    scatter = accuracy * (1.0 - accuracy) / (counts - 1)  # unbiased variance of accuracy
    return ((accuracy - mean_confidence) ** 2 - scatter) @ (counts / counts.sum())


def ece_debiased(
    confidence: Any, correct: Any, n_bins: int = 15, resamples: int = BOOTSTRAP_RESAMPLES
) -> dict[str, Any] | None:
    """Debiased RMS calibration error with a bootstrap 95 % interval (module docstring); None
    for fewer than 2 images. `confidence` is each image's top probability, `correct` whether
    its top class is the true one."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n, bins = confidence.size, min(int(n_bins), confidence.size // 2)
    if bins < 1:
        return None
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    order = np.lexsort((correct, confidence))  # one order whatever the images' order, then
    order = order[rng.permutation(n)]  # ties broken at random (not by correctness)
    order = order[np.argsort(confidence[order], kind="stable")]
    confidence, correct = confidence[order], correct[order]  # (N,) sorted by confidence
    counts = equal_mass_counts(n, bins)  # (bins,) each >= 2
    starts = np.cumsum(counts) - counts
    mean_confidence = np.add.reduceat(confidence, starts) / counts
    point = float(_debiased_squared_error(mean_confidence, correct[None], counts)[0])
    # The resamples' world: each image right with probability its confidence plus its bin's
    # observed gap; `truth` is that world's squared calibration error.
    gap = np.add.reduceat(correct, starts) / counts - mean_confidence
    right = np.clip(confidence + np.repeat(gap, counts), 0.0, 1.0)
    truth = float((np.add.reduceat(right, starts) / counts - mean_confidence) ** 2 @ (counts / n))
    errors = np.empty(resamples)  # each resample's estimate minus the world's truth
    for start in range(0, resamples, 100):  # 100 resamples at a time: (100, N) in memory
        draws = rng.random((min(100, resamples - start), n)) < right
        errors[start : start + len(draws)] = (
            _debiased_squared_error(mean_confidence, draws.astype(np.float64), counts) - truth
        )
    high, low = np.clip(point - np.percentile(errors, [2.5, 97.5]), -1.0, 1.0)  # |error| <= 1

    def root(value: float) -> float:
        return float(np.sign(value) * np.sqrt(abs(value)))

    ci95 = [root(min(low, point)), root(max(high, point))]
    return {
        "estimate": root(point),
        "ci95": ci95,
        "bins": bins,
        "resamples": resamples,
        "target": ECE_TARGET,  # met: the interval below it, missed: above it, else None
        "meets_target": True if ci95[1] <= ECE_TARGET else False if ci95[0] > ECE_TARGET else None,
    }


def classification_report(
    y_true: Any, probs: Any, class_names: Sequence[str], *, n_bins: int = 15
) -> dict[str, Any]:
    """Every metric (module docstring) of `probs` (N, C) for `y_true` (N,), JSON-ready."""
    names = [str(name) for name in class_names]
    if not names:
        raise ValueError("class_names is empty; pass one name per probability column.")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}.")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int | np.integer) or n_bins < 1:
        raise ValueError(f"n_bins must be an int >= 1, got {n_bins!r}.")
    num_classes = len(names)
    true = _labels(y_true, "y_true", num_classes)
    if true.size == 0:
        raise ValueError("cannot compute metrics of an empty set (y_true has no samples).")
    prob = _probabilities(probs, true.size, num_classes)

    pred = prob.argmax(axis=1)
    cm = confusion_matrix(true, pred, num_classes)
    stats = _scores(true, pred, num_classes)
    aucs = {name: binary_roc_auc(true == c, prob[:, c]) for c, name in enumerate(names)}
    defined = [auc for auc in aucs.values() if auc is not None]
    ece, reliability = _reliability(true, prob, int(n_bins))
    true_class_prob = np.clip(prob[np.arange(true.size), true], PROB_CLIP, 1.0)

    return {
        "n": int(true.size),
        "class_names": names,
        **{key: stats[key] for key in SUMMARY},
        "per_class": {
            name: {
                "precision": float(stats["precision"][c]),
                "recall": float(stats["recall"][c]),
                "f1": float(stats["f1"][c]),
                "support": int(stats["support"][c]),
            }
            for c, name in enumerate(names)
        },
        "confusion_matrix": cm.tolist(),
        "roc_auc_ovr": aucs,
        "macro_roc_auc": float(np.mean(defined)) if defined else None,
        "ece": ece,
        "ece_floor": ece_floor(prob, int(n_bins)),
        "ece_debiased": ece_debiased(prob.max(axis=1), pred == true, int(n_bins)),
        "reliability": reliability,
        "log_loss": float(-np.log(true_class_prob).mean()),
    }


def worst_errors(y_true: Any, probs: Any, k: int) -> list[int]:
    """Return the indices of up to `k` misclassified samples, most confident prediction first."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise ValueError(f"k must be an int >= 0, got {k!r}.")
    prob = np.asarray(probs, dtype=np.float64)
    if prob.ndim != 2 or prob.shape[1] < 1:
        raise ValueError(f"probs must have shape (N, C) with C >= 1, got {prob.shape}.")
    true = _labels(y_true, "y_true", prob.shape[1])
    if true.size != prob.shape[0]:
        raise ValueError(
            f"y_true has {true.size} samples but probs has {prob.shape[0]} rows; they must match."
        )
    wrong = np.flatnonzero(prob.argmax(axis=1) != true)
    confidence = prob[wrong].max(axis=1) if wrong.size else np.empty(0)
    order = np.argsort(-confidence, kind="stable")  # ties: lower index first
    return [int(i) for i in wrong[order][: int(k)]]

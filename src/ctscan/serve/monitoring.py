"""Drift monitoring: recent requests against the training reference, by two-sample KS tests.

`report()` runs one two-sided Kolmogorov-Smirnov test (scipy.stats.ks_2samp) per image FEATURE
(data/reference.py) between the window and the sample written by preprocess, and one on the
model's confidence when the train images' is given. See docs/monitoring.md. The
`ctscan_drift_*` gauges (`register_metrics`; NaN before the first request) follow every report.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import ks_2samp

from ctscan.data.reference import FEATURES, check_reference, features_matrix

CONFIDENCE = "confidence"
_INDEX = {name: i for i, name in enumerate(FEATURES)}


class DriftMonitor:
    """A bounded, thread-safe window of request statistics, tested against the training reference.

    With k tests a feature drifts when its p-value < alpha / k (Bonferroni; repeated reports are
    not corrected for) and the window holds `min_samples` values of it.
    """

    def __init__(
        self,
        reference: Mapping[str, Any],
        *,
        window: int = 500,
        min_samples: int = 50,
        alpha: float = 0.01,
        confidence_reference: Sequence[float] | None = None,
    ) -> None:
        reference = check_reference(reference)
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        self.window, self.min_samples, self.alpha = window, min_samples, alpha
        self.image_size = int(reference["image_size"])
        self.features: tuple[str, ...] = tuple(reference["features"])
        self._reference: dict[str, np.ndarray] = {
            name: np.asarray(reference["samples"][name], dtype=np.float64) for name in self.features
        }
        if confidence_reference is not None:  # checked by server.read_confidence_reference
            self._reference[CONFIDENCE] = np.asarray(confidence_reference, dtype=np.float64)
        self.tests: tuple[str, ...] = tuple(self._reference)
        self._window: deque[tuple[np.ndarray, float | None]] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._report_lock = threading.Lock()
        self._gauges: dict[str, Any] | None = None

    def observe(self, image: np.ndarray, confidence: float | None = None) -> None:
        """Add one request: its (S, S) uint8 image as the model saw it, and its confidence."""
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[0] == 1:
            image = image[0]
        if image.dtype != np.uint8 or image.shape != (self.image_size, self.image_size):
            raise ValueError(
                f"expected a uint8 image ({self.image_size}, {self.image_size}) as in the "
                f"reference, got {image.dtype} {image.shape}"
            )
        row = features_matrix(image[None])[0]  # computed outside the lock
        finite = confidence is not None and math.isfinite(float(confidence))
        with self._lock:
            self._window.append((row, float(confidence) if finite else None))

    def __len__(self) -> int:
        """Requests in the window now."""
        with self._lock:
            return len(self._window)

    def report(self) -> dict[str, Any]:
        """Test the window against the reference, refresh the gauges and return the report (a
        feature's statistic and p_value are None while the window holds no value for it)."""
        with self._lock:
            snapshot = list(self._window)
        rows = np.array([row for row, _ in snapshot], dtype=np.float64).reshape(-1, len(FEATURES))
        window_values = {name: rows[:, _INDEX[name]] for name in self.features}
        if CONFIDENCE in self._reference:
            window_values[CONFIDENCE] = np.array(
                [c for _, c in snapshot if c is not None], dtype=np.float64
            )
        corrected = self.alpha / len(self.tests)
        features: dict[str, dict[str, Any]] = {}
        for name in self.tests:
            ref, recent = self._reference[name], window_values[name]
            statistic = p_value = None
            if recent.size:
                result = ks_2samp(ref, recent)
                statistic, p_value = float(result.statistic), float(result.pvalue)
            # judged on min_samples values of its own (confidence may be missing for some)
            drifted = (
                p_value is not None and recent.size >= self.min_samples and p_value < corrected
            )
            features[name] = {
                "statistic": statistic,
                "p_value": p_value,
                "drift": bool(drifted),
                "reference_mean": float(ref.mean()),
                "window_mean": float(recent.mean()) if recent.size else None,
                "n_reference": int(ref.size),
                "n_window": int(recent.size),
            }
        drifted_names = [name for name, f in features.items() if f["drift"]]
        result_report = {
            "window": len(snapshot),
            "window_capacity": self.window,
            "min_samples": self.min_samples,
            "enough_data": len(snapshot) >= self.min_samples,
            "drift": bool(drifted_names),
            "alpha": self.alpha,
            "tests": len(self.tests),
            "corrected_alpha": corrected,
            "features": features,
            "drifted": drifted_names,
        }
        self.update_metrics(result_report)
        return result_report

    def register_metrics(self, registry: Any) -> None:
        """Create the drift gauges in a prometheus_client registry (a second call: ValueError)."""
        from prometheus_client import Gauge

        help_texts = {
            "statistic": "two-sample KS statistic of recent requests vs the training reference",
            "p_value": "KS p-value per feature (drift when below alpha / number of tests)",
            "detected": "1 when drift is detected on any feature (Bonferroni-corrected KS tests)",
            "window_size": "requests in the drift window",
        }
        self._gauges = {
            name: Gauge(
                f"ctscan_drift_{name}",
                text,
                ["feature"] if name in ("statistic", "p_value") else [],
                registry=registry,
            )
            for name, text in help_texts.items()
        }
        self.update_metrics()

    def update_metrics(self, report: Mapping[str, Any] | None = None) -> None:
        """Set the gauges from `report` (a fresh one if None); nothing before `register_metrics`."""
        if self._gauges is None:
            return
        if report is None:
            self.report()  # calls back here with its result
            return
        nan = float("nan")
        with self._report_lock:
            g = self._gauges
            for name, feature in report["features"].items():
                for key in ("statistic", "p_value"):
                    g[key].labels(feature=name).set(nan if feature[key] is None else feature[key])
            g["detected"].set(1 if report["drift"] else 0)
            g["window_size"].set(report["window"])

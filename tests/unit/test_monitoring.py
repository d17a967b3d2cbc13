"""DriftMonitor: KS tests of recent requests against the training reference, and its gauges."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ctscan.data.reference import FEATURES, build_reference
from ctscan.errors import DataError
from ctscan.serve.monitoring import CONFIDENCE, DriftMonitor
from tests.unit.conftest_store import make_split

SIZE = 32
INTENSITY = ("mean", "p50", "p95")


def ct_like(n_per_class: int, seed: int) -> np.ndarray:
    """(4 * n, S, S) uint8 images from the synthetic store's generator (noise + a bright square)."""
    return make_split(n_per_class, SIZE, seed, "x").images[:, 0]


@pytest.fixture(scope="module")
def reference() -> dict:
    return build_reference(ct_like(50, seed=0))  # 200 train images


def feed(monitor: DriftMonitor, images: np.ndarray, confidence: float | None = None) -> None:
    for image in images:
        monitor.observe(image, confidence)


def test_same_distribution_is_not_drift(reference: dict) -> None:
    monitor = DriftMonitor(reference, window=500, min_samples=50)
    feed(monitor, ct_like(25, seed=7))  # 100 new images from the same generator
    report = monitor.report()
    assert report["enough_data"] and report["window"] == 100
    assert not report["drift"] and report["drifted"] == []
    assert set(report["features"]) == set(FEATURES)
    for name, f in report["features"].items():
        assert f["p_value"] > report["corrected_alpha"], name
        assert f["n_window"] == 100 and f["n_reference"] == 200


@pytest.mark.parametrize(
    "shift",
    [
        pytest.param(lambda x: np.clip(x.astype(int) + 80, 0, 255).astype(np.uint8), id="bright"),
        pytest.param(lambda x: 255 - x, id="inverted"),
    ],
)
def test_brighter_or_inverted_requests_are_drift(reference: dict, shift) -> None:
    monitor = DriftMonitor(reference, window=500, min_samples=50)
    feed(monitor, shift(ct_like(25, seed=7)))
    report = monitor.report()
    assert report["drift"] and report["enough_data"]
    assert set(INTENSITY) <= set(report["drifted"])
    for name in INTENSITY:
        f = report["features"][name]
        assert f["drift"] and f["statistic"] > 0.9 and f["p_value"] < 1e-10
        assert f["window_mean"] > f["reference_mean"]
    mean = report["features"]["mean"]
    assert mean["window_mean"] > mean["reference_mean"] + 50


def test_no_drift_is_claimed_below_min_samples(reference: dict) -> None:
    monitor = DriftMonitor(reference, window=500, min_samples=50)
    feed(monitor, 255 - ct_like(25, seed=7)[:49])  # obviously different, but only 49
    report = monitor.report()
    assert report["window"] == 49 and not report["enough_data"]
    assert not report["drift"] and report["drifted"] == []
    assert not any(f["drift"] for f in report["features"].values())
    assert report["features"]["mean"]["statistic"] > 0.9  # the statistics are still shown
    monitor.observe(255 - ct_like(1, seed=8)[0])
    assert monitor.report()["drift"]  # the 50th request makes it count


def test_an_empty_window_reports_no_statistics(reference: dict) -> None:
    report = DriftMonitor(reference).report()
    assert report["window"] == 0 and not report["drift"]
    assert report["features"]["mean"]["statistic"] is None
    assert report["features"]["mean"]["window_mean"] is None


def test_the_window_keeps_only_the_latest_requests(reference: dict) -> None:
    monitor = DriftMonitor(reference, window=100, min_samples=50)
    feed(monitor, 255 - ct_like(25, seed=7))  # 100 drifted requests ...
    assert monitor.report()["drift"]
    feed(monitor, ct_like(25, seed=9))  # ... pushed out by 100 normal ones
    report = monitor.report()
    assert report["window"] == len(monitor) == 100 and report["window_capacity"] == 100
    assert not report["drift"]


def _constant_reference(values: np.ndarray, size: int = 4) -> dict:
    """A reference whose images were constant: mean == p50 == the value."""
    samples = [float(v) for v in values]
    return {
        "format": 1,
        "features": ["mean", "p50"],
        "samples": {"mean": samples, "p50": samples},
        "n": len(samples),
        "image_size": size,
    }


@pytest.mark.parametrize(("shift", "drift"), [(34, False), (40, True)])
def test_bonferroni_divides_alpha_by_the_number_of_tests(shift: int, drift: bool) -> None:
    from scipy.stats import ks_2samp

    reference = _constant_reference(np.arange(200))
    window = np.arange(0, 200, 2) + shift
    p_value = ks_2samp(np.arange(200), window).pvalue
    # shift 34: p = 0.041, under alpha but over alpha / 2; shift 40: p = 0.009, under both
    assert p_value < 0.05 and (p_value < 0.025) == drift
    monitor = DriftMonitor(reference, min_samples=50, alpha=0.05)
    feed(monitor, np.repeat(window.astype(np.uint8), 16).reshape(-1, 4, 4))
    report = monitor.report()
    assert report["tests"] == 2 and report["corrected_alpha"] == pytest.approx(0.025)
    assert report["features"]["mean"]["p_value"] == pytest.approx(p_value)
    assert report["drift"] is drift
    assert report["drifted"] == (["mean", "p50"] if drift else [])


def test_confidence_is_tested_when_a_reference_is_given(reference: dict) -> None:
    rng = np.random.default_rng(0)
    confident = list(rng.uniform(0.9, 1.0, 300))
    monitor = DriftMonitor(reference, min_samples=50, confidence_reference=confident)
    images = ct_like(25, seed=7)
    for i, image in enumerate(images):  # same images, but an unsure model; some unknown
        monitor.observe(image, None if i % 10 == 0 else float(rng.uniform(0.3, 0.6)))
    report = monitor.report()
    assert report["tests"] == len(FEATURES) + 1
    assert report["corrected_alpha"] == pytest.approx(0.01 / (len(FEATURES) + 1))
    assert report["drifted"] == [CONFIDENCE]
    assert report["features"][CONFIDENCE]["n_window"] == 90  # None is not a confidence
    assert report["features"][CONFIDENCE]["n_reference"] == 300


def test_confidence_is_not_tested_without_its_reference(reference: dict) -> None:
    monitor = DriftMonitor(reference, min_samples=50)
    feed(monitor, ct_like(25, seed=7), confidence=0.1)
    report = monitor.report()
    assert CONFIDENCE not in report["features"] and report["tests"] == len(FEATURES)


def test_observe_from_eight_threads(reference: dict) -> None:
    images = ct_like(8, seed=3)  # 32 images
    capacity = 8 * 40
    big = DriftMonitor(reference, window=capacity + 1)
    small = DriftMonitor(reference, window=50)
    start = threading.Barrier(9)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            start.wait()
            for i in range(40):
                big.observe(images[i % len(images)], 0.9)
                small.observe(images[i % len(images)], 0.9)
        except BaseException as exc:  # pragma: no cover - shown by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    start.wait()
    reports = [small.report() for _ in range(5)]  # while the threads observe
    for t in threads:
        t.join()
    assert not errors
    assert len(big) == capacity  # no observation lost
    assert len(small) == 50 and small.report()["window"] == 50  # bounded
    assert all(r["window"] <= 50 for r in reports)


def test_bad_reference_and_bad_images_are_refused(reference: dict) -> None:
    with pytest.raises(DataError, match="'samples' is missing"):
        DriftMonitor({k: v for k, v in reference.items() if k != "samples"})
    with pytest.raises(ValueError, match="alpha"):
        DriftMonitor(reference, alpha=1.5)
    monitor = DriftMonitor(reference)
    with pytest.raises(ValueError, match=r"\(32, 32\)"):
        monitor.observe(np.zeros((16, 16), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        monitor.observe(np.zeros((SIZE, SIZE), np.float32))
    monitor.observe(np.zeros((1, SIZE, SIZE), np.uint8))  # (1, S, S) is one image too
    assert len(monitor) == 1


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_gauges_carry_the_drift_report(reference: dict) -> None:
    registry = CollectorRegistry()
    monitor = DriftMonitor(reference, min_samples=50)
    monitor.register_metrics(registry)
    before = _samples(registry)
    assert before[("ctscan_drift_detected", ())] == 0
    assert before[("ctscan_drift_window_size", ())] == 0
    assert np.isnan(before[("ctscan_drift_p_value", (("feature", "mean"),))])

    feed(monitor, 255 - ct_like(15, seed=7))  # 60 inverted requests
    report = monitor.report()
    after = _samples(registry)
    assert after[("ctscan_drift_detected", ())] == 1
    assert after[("ctscan_drift_window_size", ())] == 60
    for name in FEATURES:
        key = (("feature", name),)
        assert after[("ctscan_drift_statistic", key)] == pytest.approx(
            report["features"][name]["statistic"]
        )
        assert after[("ctscan_drift_p_value", key)] == pytest.approx(
            report["features"][name]["p_value"]
        )
    text = generate_latest(registry).decode()
    assert 'ctscan_drift_statistic{feature="p50"}' in text


def test_update_metrics_without_a_report_runs_one(reference: dict) -> None:
    registry = CollectorRegistry()
    monitor = DriftMonitor(reference, min_samples=50)
    monitor.update_metrics()  # not registered: nothing to do, no error
    monitor.register_metrics(registry)
    feed(monitor, ct_like(15, seed=7))
    assert _samples(registry)[("ctscan_drift_window_size", ())] == 0  # not refreshed yet
    monitor.update_metrics()
    assert _samples(registry)[("ctscan_drift_window_size", ())] == 60

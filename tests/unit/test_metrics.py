"""Tests for ctscan.engine.metrics: hand-computed values and identities that must always hold."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctscan.engine.metrics import (
    binary_roc_auc,
    classification_report,
    confusion_matrix,
    ece_debiased,
    equal_mass_counts,
    quick_metrics,
    worst_errors,
)

NAMES = ["a", "b", "c"]

# Hand-worked example: 3 classes, 6 samples.
#   i  true  probs                 pred  conf   correct
#   0  0     [0.70, 0.20, 0.10]    0     0.70   yes
#   1  0     [0.30, 0.50, 0.20]    1     0.50   no
#   2  1     [0.05, 0.90, 0.05]    1     0.90   yes
#   3  1     [0.25, 0.30, 0.45]    2     0.45   no
#   4  2     [0.10, 0.15, 0.75]    2     0.75   yes
#   5  2     [0.10, 0.35, 0.55]    2     0.55   yes
Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array(
    [
        [0.70, 0.20, 0.10],
        [0.30, 0.50, 0.20],
        [0.05, 0.90, 0.05],
        [0.25, 0.30, 0.45],
        [0.10, 0.15, 0.75],
        [0.10, 0.35, 0.55],
    ]
)


def test_hand_computed_report() -> None:
    report = classification_report(Y, P, NAMES, n_bins=5)
    # Confusion matrix (rows true, cols predicted):
    #   true 0 -> pred 0 once, pred 1 once; true 1 -> pred 1 once, pred 2 once;
    #   true 2 -> pred 2 twice
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [0, 0, 2]]
    assert report["n"] == 6
    assert report["class_names"] == NAMES
    # accuracy = trace / n = 4 / 6
    assert report["accuracy"] == pytest.approx(4 / 6)
    # precision = TP / column sum: a 1/1, b 1/2, c 2/3
    # recall    = TP / row sum:    a 1/2, b 1/2, c 2/2
    # f1 = 2PR/(P+R):              a 2/3, b 1/2, c 4/5
    expected = {
        "a": (1.0, 0.5, 2 / 3, 2),
        "b": (0.5, 0.5, 0.5, 2),
        "c": (2 / 3, 1.0, 0.8, 2),
    }
    for name, (precision, recall, f1, support) in expected.items():
        row = report["per_class"][name]
        assert row["precision"] == pytest.approx(precision)
        assert row["recall"] == pytest.approx(recall)
        assert row["f1"] == pytest.approx(f1)
        assert row["support"] == support
    # macro F1 = (2/3 + 1/2 + 4/5) / 3 = 59/90; all supports are 2 so weighted F1 is the same.
    assert report["macro_f1"] == pytest.approx(59 / 90)
    assert report["weighted_f1"] == pytest.approx(59 / 90)
    # balanced accuracy = mean recall = (1/2 + 1/2 + 1) / 3 = 2/3
    assert report["balanced_accuracy"] == pytest.approx(2 / 3)
    # AUC one-vs-rest, counting (positive, negative) pairs where the positive scores higher:
    #   a: positives 0.70, 0.30 vs negatives 0.05, 0.25, 0.10, 0.10 -> 8/8 = 1.0
    #   b: positives 0.90, 0.30 vs negatives 0.20, 0.50, 0.15, 0.35 -> (4 + 2)/8 = 0.75
    #   c: positives 0.75, 0.55 vs negatives 0.10, 0.20, 0.05, 0.45 -> 8/8 = 1.0
    assert report["roc_auc_ovr"] == pytest.approx({"a": 1.0, "b": 0.75, "c": 1.0})
    assert report["macro_roc_auc"] == pytest.approx(2.75 / 3)
    # ECE with 5 bins (0.2 wide), each bin (lower, upper]:
    #   (0.4, 0.6]: conf 0.50 no, 0.45 no, 0.55 yes -> count 3, conf 0.5,   acc 1/3, gap 1/6
    #   (0.6, 0.8]: conf 0.70 yes, 0.75 yes        -> count 2, conf 0.725, acc 1,   gap 0.275
    #   (0.8, 1.0]: conf 0.90 yes                  -> count 1, conf 0.9,   acc 1,   gap 0.1
    #   ECE = 3/6 * 1/6 + 2/6 * 0.275 + 1/6 * 0.1 = 1.15 / 6
    assert report["ece"] == pytest.approx(1.15 / 6)
    bins = report["reliability"]
    assert [b["count"] for b in bins] == [0, 0, 3, 2, 1]
    assert [b["lower"] for b in bins] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8])
    assert [b["upper"] for b in bins] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert bins[0]["mean_confidence"] is None and bins[0]["accuracy"] is None
    assert bins[2]["mean_confidence"] == pytest.approx(0.5)
    assert bins[2]["accuracy"] == pytest.approx(1 / 3)
    assert bins[3]["mean_confidence"] == pytest.approx(0.725)
    assert bins[4]["accuracy"] == pytest.approx(1.0)
    # log loss = -mean(log p(true class)) over 0.70, 0.30, 0.90, 0.30, 0.75, 0.55
    true_probs = [0.70, 0.30, 0.90, 0.30, 0.75, 0.55]
    assert report["log_loss"] == pytest.approx(-sum(math.log(p) for p in true_probs) / 6)


def test_report_is_json_ready() -> None:
    report = classification_report(Y, P, NAMES)
    assert json.loads(json.dumps(report)) == report
    assert len(report["reliability"]) == 15


def _two_class(confidence: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (N, 2) probabilities: class 0 predicted with `confidence`, right where `right`."""
    probs = np.stack([confidence, 1.0 - confidence], axis=1)
    return np.where(right, 0, 1), probs


def test_ece_floor_is_the_binomial_scatter_of_one_bin() -> None:
    # 400 images all at confidence 0.5 share one bin: a calibrated model gets k ~ Binomial(400, .5)
    # right and reads ECE = |k / 400 - 0.5|, whose median is 0.6745 * sqrt(0.25 / 400) = 0.0169.
    y, probs = _two_class(np.full(400, 0.5), np.arange(400) % 2 == 0)
    floor = classification_report(y, probs, ["a", "b"])["ece_floor"]
    assert floor["median"] == pytest.approx(0.6745 * math.sqrt(0.25 / 400), rel=0.15)
    assert floor["p95"] == pytest.approx(1.96 * math.sqrt(0.25 / 400), rel=0.15)
    # certain answers leave nothing to scatter
    y, probs = _two_class(np.ones(50), np.ones(50, dtype=bool))
    assert classification_report(y, probs, ["a", "b"])["ece_floor"] == {"median": 0.0, "p95": 0.0}


def test_ece_floor_separates_calibrated_from_miscalibrated_models() -> None:
    # Calibrated models (labels drawn from their own confidences) read an ECE above the floor's
    # p95 about 5 % of the time; a model 99 % sure and 70 % right reads far above it every time.
    rng = np.random.default_rng(1)
    above = 0
    for _ in range(200):
        confidence = rng.uniform(0.55, 1.0, size=259)
        y, probs = _two_class(confidence, rng.random(259) < confidence)
        report = classification_report(y, probs, ["a", "b"])
        above += report["ece"] > report["ece_floor"]["p95"]
        assert report["ece_floor"] == classification_report(y, probs, ["a", "b"])["ece_floor"]
    assert 2 <= above <= 20  # 5 % of 200 = 10; binomial 99.9 % range
    y, probs = _two_class(np.full(259, 0.99), rng.random(259) < 0.7)
    report = classification_report(y, probs, ["a", "b"])
    assert report["ece"] > 5 * report["ece_floor"]["p95"]


def test_ece_floor_shrinks_with_the_number_of_images() -> None:
    floors = []
    for n in (100, 400, 1600):
        confidence = np.linspace(0.6, 0.99, n)
        y, probs = _two_class(confidence, np.ones(n, dtype=bool))
        floors.append(classification_report(y, probs, ["a", "b"])["ece_floor"]["median"])
    # about 1 / sqrt(N): each fourfold increase roughly halves it
    assert floors[0] / floors[1] == pytest.approx(2.0, rel=0.25)
    assert floors[1] / floors[2] == pytest.approx(2.0, rel=0.25)


def test_quick_metrics_hand_computed() -> None:
    quick = quick_metrics(Y, P.argmax(axis=1), 3)
    assert quick == pytest.approx({"accuracy": 4 / 6, "macro_f1": 59 / 90})


def test_worst_errors_orders_by_confidence() -> None:
    # Errors are sample 1 (conf 0.50) and sample 3 (conf 0.45).
    assert worst_errors(Y, P, 10) == [1, 3]
    assert worst_errors(Y, P, 1) == [1]
    assert worst_errors(Y, P, 0) == []
    assert worst_errors(Y[[0, 2]], P[[0, 2]], 5) == []


def test_zero_division_is_zero() -> None:
    # Class 2 is never predicted and never true; class 1 is predicted but never true.
    y_true = np.array([0, 0, 0])
    y_pred = np.array([0, 1, 0])
    probs = np.eye(3)[y_pred]
    report = classification_report(y_true, probs, NAMES)
    assert report["per_class"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert report["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # a: P = 1, R = 2/3, F1 = 0.8. Macro over classes seen in true or pred (a, b): (0.8 + 0) / 2.
    assert report["per_class"]["a"]["f1"] == pytest.approx(0.8)
    assert report["macro_f1"] == pytest.approx(0.4)
    # Balanced accuracy averages recall over classes present in y_true only (a).
    assert report["balanced_accuracy"] == pytest.approx(2 / 3)
    # Every sample is class a: a has no negatives, b and c no positives -> every AUC undefined.
    assert report["roc_auc_ovr"] == {"a": None, "b": None, "c": None}
    assert report["macro_roc_auc"] is None


def test_auc_with_ties_counts_half() -> None:
    # positives 0.4, 0.6; negatives 0.4, 0.2: pairs 0.4~0.4 -> 0.5, 0.4>0.2, 0.6>0.4, 0.6>0.2
    assert binary_roc_auc([1, 1, 0, 0], [0.4, 0.6, 0.4, 0.2]) == pytest.approx(3.5 / 4)
    assert binary_roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert binary_roc_auc([1, 1], [0.1, 0.2]) is None


def test_log_loss_clips_zero_probability() -> None:
    report = classification_report(np.array([0]), np.array([[0.0, 1.0]]), ["x", "y"])
    assert report["log_loss"] == pytest.approx(-math.log(1e-12))


@pytest.mark.parametrize(
    ("y_true", "probs", "names", "match"),
    [
        (np.array([], dtype=int), np.zeros((0, 3)), NAMES, "empty"),
        (Y, P[:5], NAMES, "shape"),
        (Y, P[:, :2], NAMES, "shape"),
        (Y, P * 2, NAMES, r"\[0, 1\]"),
        (Y, P * 0.9, NAMES, "sum to 1"),
        (Y, np.log(P), NAMES, "logits"),
        (Y + 1, P, NAMES, "class index 3"),
        (Y.astype(float), P, NAMES, "integer"),
        (Y, P, ["a", "a", "b"], "unique"),
        (Y, P, [], "empty"),
    ],
)
def test_report_rejects_bad_input(y_true, probs, names, match) -> None:
    with pytest.raises(ValueError, match=match):
        classification_report(y_true, probs, names)


def test_other_bad_inputs() -> None:
    with pytest.raises(ValueError, match="n_bins"):
        classification_report(Y, P, NAMES, n_bins=0)
    with pytest.raises(ValueError, match="empty"):
        quick_metrics(np.array([], dtype=int), np.array([], dtype=int), 3)
    with pytest.raises(ValueError, match="same length"):
        confusion_matrix([0, 1], [0], 2)
    with pytest.raises(ValueError, match="num_classes"):
        confusion_matrix([0], [0], 0)
    with pytest.raises(ValueError, match="k must be"):
        worst_errors(Y, P, -1)
    with pytest.raises(ValueError, match="must match"):
        worst_errors(Y[:3], P, 1)


def test_imports_no_heavy_modules() -> None:
    code = (
        "import sys, ctscan.engine.metrics; "
        "bad = [m for m in ('torch', 'matplotlib', 'sklearn') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- property-based identities


@st.composite
def labelled_probs(draw, min_n: int = 1, max_n: int = 30):
    """Draw (y_true (N,), probs (N, C), C) with random labels and probability rows."""
    num_classes = draw(st.integers(2, 5))
    n = draw(st.integers(min_n, max_n))
    y = np.array(draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)))
    raw = np.array(
        draw(
            st.lists(
                st.lists(st.integers(1, 20), min_size=num_classes, max_size=num_classes),
                min_size=n,
                max_size=n,
            )
        ),
        dtype=np.float64,
    ).reshape(n, num_classes)
    return y.astype(np.int64), raw / raw.sum(axis=1, keepdims=True), num_classes


def _names(num_classes: int) -> list[str]:
    return [f"class{i}" for i in range(num_classes)]


@settings(max_examples=60, deadline=None)
@given(labelled_probs())
def test_report_identities(case) -> None:
    y, probs, num_classes = case
    report = classification_report(y, probs, _names(num_classes), n_bins=7)
    cm = np.array(report["confusion_matrix"])
    pred = probs.argmax(axis=1)
    n = len(y)
    # Confusion matrix: rows sum to true counts, columns to predicted counts, total to n.
    assert cm.sum() == n
    assert cm.sum(axis=1).tolist() == np.bincount(y, minlength=num_classes).tolist()
    assert cm.sum(axis=0).tolist() == np.bincount(pred, minlength=num_classes).tolist()
    assert report["accuracy"] == pytest.approx(np.trace(cm) / n)
    assert report["accuracy"] == pytest.approx(float(np.mean(pred == y)))
    per_class = report["per_class"].values()
    assert sum(row["support"] for row in per_class) == n
    f1s = [row["f1"] for row in per_class]
    assert min(f1s) - 1e-12 <= report["macro_f1"] <= max(f1s) + 1e-12
    recalls = [row["recall"] for row in per_class if row["support"] > 0]
    assert report["balanced_accuracy"] == pytest.approx(float(np.mean(recalls)))
    for row in per_class:
        for key in ("precision", "recall", "f1"):
            assert 0.0 <= row[key] <= 1.0
    # Reliability bins partition the samples; ECE is in [0, 1].
    assert sum(b["count"] for b in report["reliability"]) == n
    assert 0.0 <= report["ece"] <= 1.0
    assert report["log_loss"] >= 0.0
    # quick_metrics gives the same numbers from hard predictions.
    quick = quick_metrics(y, pred, num_classes)
    assert quick["accuracy"] == pytest.approx(report["accuracy"])
    assert quick["macro_f1"] == pytest.approx(report["macro_f1"])
    # worst_errors returns exactly the misclassified samples, by falling confidence.
    errors = worst_errors(y, probs, n)
    assert sorted(errors) == np.flatnonzero(pred != y).tolist()
    confidences = probs.max(axis=1)[errors]
    assert all(np.diff(confidences) <= 0)


@settings(max_examples=40, deadline=None)
@given(labelled_probs())
def test_perfect_predictions(case) -> None:
    _, probs, num_classes = case
    y = probs.argmax(axis=1)  # every prediction right
    report = classification_report(y, probs, _names(num_classes), n_bins=10)
    assert report["accuracy"] == 1.0
    assert report["macro_f1"] == 1.0
    assert report["weighted_f1"] == 1.0
    assert report["balanced_accuracy"] == 1.0
    for row in report["per_class"].values():
        if row["support"]:
            assert row["precision"] == row["recall"] == row["f1"] == 1.0
    # Every bin has accuracy 1 >= its mean confidence, so no gaps cancel:
    # ECE = sum_b (n_b / n) * (1 - conf_b) = 1 - mean confidence, whatever the binning.
    assert report["ece"] == pytest.approx(1.0 - probs.max(axis=1).mean())


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=1, max_size=25))
def test_auc_matches_pairwise_count_and_is_rank_invariant(pairs) -> None:
    labels = np.array([p for p, _ in pairs])
    scores = np.array([s for _, s in pairs], dtype=np.float64)
    auc = binary_roc_auc(labels, scores)
    if labels.all() or not labels.any():
        assert auc is None
        return
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert auc == pytest.approx(wins / (len(pos) * len(neg)))
    # Strictly increasing transforms keep the order and the ties, so the AUC does not move.
    assert binary_roc_auc(labels, 3 * scores + 1) == pytest.approx(auc)
    assert binary_roc_auc(labels, scores**3) == pytest.approx(auc)
    assert binary_roc_auc(labels, np.exp(scores)) == pytest.approx(auc)
    # Reversing the score mirrors the AUC.
    assert binary_roc_auc(labels, -scores) == pytest.approx(1.0 - auc)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 10), st.integers(1, 10), st.integers(0, 1000))
def test_auc_of_separating_score(n_pos, n_neg, seed) -> None:
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.uniform(0.6, 1.0, n_pos), rng.uniform(0.0, 0.4, n_neg)])
    labels = np.array([True] * n_pos + [False] * n_neg)
    order = rng.permutation(n_pos + n_neg)
    assert binary_roc_auc(labels[order], scores[order]) == 1.0
    assert binary_roc_auc(labels[order], -scores[order]) == 0.0


@settings(max_examples=40, deadline=None)
@given(labelled_probs(min_n=0))
def test_confusion_matrix_counts_pairs(case) -> None:
    y, probs, num_classes = case
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred, num_classes)
    assert cm.shape == (num_classes, num_classes)
    assert cm.sum() == len(y)
    for i in range(num_classes):
        for j in range(num_classes):
            assert cm[i, j] == int(np.sum((y == i) & (pred == j)))


def _calibrated_sets(profile: str, count: int, n: int = 259, gap: float = 0.0):
    """`count` synthetic (confidence, correct) sets: each image right with probability
    confidence - gap (gap 0: a perfectly calibrated model)."""
    rng = np.random.default_rng(7)
    for _ in range(count):
        if profile == "spread":
            confidence = rng.uniform(0.55, 1.0, n)
        else:  # "confident": most above 0.9, as the main job's model on the test split
            confidence = 1.0 - 0.5 * rng.beta(0.3, 5.0, n)
        yield confidence, rng.random(n) < confidence - gap


@pytest.mark.parametrize("profile", ["spread", "confident"])
def test_ece_debiased_reads_zero_for_a_calibrated_model_where_ece_does_not(profile: str) -> None:
    covered, estimates, plain = 0, [], []
    for confidence, correct in _calibrated_sets(profile, 200):
        debiased = ece_debiased(confidence, correct)
        low, high = debiased["ci95"]
        covered += low <= 0.0 <= high
        estimates.append(np.sign(debiased["estimate"]) * debiased["estimate"] ** 2)
        y, probs = _two_class(confidence, correct)
        plain.append(classification_report(y, probs, ["a", "b"])["ece"])
    # a 95 % interval (a plain percentile bootstrap over images covered 0 only 80-94 % of the time)
    assert covered >= 0.95 * 200
    # the squared estimate is unbiased: its mean is 0 within its scatter, while binned ECE
    # averages well above 0 (0.016 to 0.05 here)
    assert abs(np.mean(estimates)) < 3 * np.std(estimates) / np.sqrt(200)
    assert np.mean(plain) > 0.01


def test_ece_debiased_finds_a_miscalibrated_model() -> None:
    # right 10 points less often than the model says: the RMS gap is 0.1 in every bin
    sets = list(_calibrated_sets("spread", 100, n=1000, gap=0.1))
    found = [ece_debiased(confidence, correct) for confidence, correct in sets]
    assert np.mean([d["estimate"] for d in found]) == pytest.approx(0.1, abs=0.01)
    assert sum(d["ci95"][0] <= 0.1 <= d["ci95"][1] for d in found) >= 90
    assert sum(d["ci95"][0] > 0.0 for d in found) >= 60  # most sets tell it from calibrated


def test_ece_debiased_hand_computed() -> None:
    # 6 images, 3 equal-mass bins of 2 after sorting by confidence:
    #   (0.6 right, 0.7 wrong): acc 0.5, conf 0.65, gap^2 0.0225, scatter 0.25 / 1
    #   (0.8 right, 0.8 right): acc 1.0, conf 0.80, gap^2 0.04,   scatter 0
    #   (0.9 wrong, 1.0 right): acc 0.5, conf 0.95, gap^2 0.2025, scatter 0.25
    # squared estimate = (0.0225 - 0.25 + 0.04 + 0.2025 - 0.25) / 3 = -0.235 / 3
    confidence = np.array([0.9, 0.6, 1.0, 0.8, 0.7, 0.8])
    correct = np.array([False, True, True, True, False, True])
    debiased = ece_debiased(confidence, correct, n_bins=3)
    assert debiased["bins"] == 3
    assert debiased["estimate"] == pytest.approx(-math.sqrt(0.235 / 3))
    assert ece_debiased([0.9], [True]) is None  # one image: no bin holds two
    assert ece_debiased([0.9] * 5, [True] * 5, n_bins=15)["bins"] == 2  # at most N // 2 bins


@given(n=st.integers(0, 2000), bins=st.integers(1, 50))
def test_equal_mass_bins_hold_equal_counts(n: int, bins: int) -> None:
    counts = equal_mass_counts(n, bins)
    assert counts.sum() == n
    assert counts.max() - counts.min() <= 1


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.sampled_from([0.5, 0.8, 0.99, 1.0]) | st.floats(0.25, 1.0), st.booleans()),
        min_size=2,
        max_size=300,
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_ece_debiased_invariants(data: list[tuple[float, bool]], seed: int) -> None:
    confidence = np.array([c for c, _ in data])
    correct = np.array([r for _, r in data])
    debiased = ece_debiased(confidence, correct, resamples=200)
    low, high = debiased["ci95"]
    assert low <= debiased["estimate"] <= high
    assert low >= -1.0 and high <= 1.0
    # the images' order does not matter, ties in confidence included
    shuffle = np.random.default_rng(seed).permutation(len(data))
    assert ece_debiased(confidence[shuffle], correct[shuffle], resamples=200) == debiased
    assert json.loads(json.dumps(debiased)) == debiased

"""The drift reference: per-image features, the reference.json schema, preprocess and train."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from ctscan.data import reference as ref_mod
from ctscan.data.preprocess import run_preprocess
from ctscan.data.reference import (
    CONFIDENCE_FILE,
    FEATURES,
    REFERENCE_FILE,
    build_reference,
    features_matrix,
    load_reference,
)
from ctscan.data.store import load_store
from ctscan.engine.checkpoint import load_model
from ctscan.engine.evaluate import predict, probabilities
from ctscan.engine.runtime import resolve_runtime
from ctscan.engine.train import run_training
from ctscan.errors import DataError
from ctscan.settings import Settings, load_settings
from tests.unit.conftest_store import engine_settings, write_synthetic_store


def image_features(image: np.ndarray) -> dict[str, float]:
    """FEATURES of one (S, S) uint8 image, by name."""
    return dict(zip(FEATURES, features_matrix(image[None])[0].tolist(), strict=True))


def test_all_black_image() -> None:
    f = image_features(np.zeros((16, 16), np.uint8))
    assert f["mean"] == 0 and f["std"] == 0
    assert f["p05"] == f["p50"] == f["p95"] == 0
    assert f["black_fraction"] == 1.0 and f["saturated_fraction"] == 0.0
    assert f["entropy"] == 0.0 and f["edge_energy"] == 0.0


def test_all_white_image() -> None:
    f = image_features(np.full((16, 16), 255, np.uint8))
    assert f["mean"] == 255 and f["p05"] == 255 and f["p95"] == 255
    assert f["black_fraction"] == 0.0 and f["saturated_fraction"] == 1.0


def test_gradient_image_has_exact_percentiles_and_fractions() -> None:
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)  # each value once
    f = image_features(image)
    assert f["mean"] == pytest.approx(127.5)
    assert f["std"] == pytest.approx(np.arange(256).std())
    # inverted CDF: the smallest v with (v + 1) / 256 >= q
    assert (f["p05"], f["p50"], f["p95"]) == (12.0, 127.0, 243.0)
    for name, q in (("p05", 5), ("p50", 50), ("p95", 95)):
        assert f[name] == np.percentile(image, q, method="inverted_cdf")
    assert f["black_fraction"] == pytest.approx(6 / 256)  # 0..5
    assert f["saturated_fraction"] == pytest.approx(6 / 256)  # 250..255
    assert f["entropy"] == pytest.approx(8.0)  # uniform over 256 values
    # 240 horizontal neighbours differ by 1, 240 vertical ones by 16
    assert f["edge_energy"] == pytest.approx((240 * 1 + 240 * 16) / 480)


def test_a_brighter_image_has_higher_intensity_features() -> None:
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 100, (32, 32), dtype=np.uint8)
    f_dark, f_bright = image_features(dark), image_features(dark + 100)
    assert f_bright["mean"] == pytest.approx(f_dark["mean"] + 100)
    assert f_bright["p50"] == f_dark["p50"] + 100
    assert f_bright["std"] == pytest.approx(f_dark["std"])
    assert f_bright["edge_energy"] == pytest.approx(f_dark["edge_energy"])


@settings(max_examples=40, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 5), st.integers(2, 9), st.integers(2, 9))))
def test_features_match_numpy_definitions(images: np.ndarray) -> None:
    matrix = features_matrix(images)
    assert matrix.shape == (len(images), len(FEATURES))
    col = {name: matrix[:, i] for i, name in enumerate(FEATURES)}
    flat = images.reshape(len(images), -1)
    np.testing.assert_allclose(col["mean"], flat.mean(axis=1), atol=1e-9)
    np.testing.assert_allclose(col["std"], flat.std(axis=1), atol=1e-6)
    for name, q in (("p05", 5), ("p50", 50), ("p95", 95)):
        expected = np.percentile(flat, q, axis=1, method="inverted_cdf")
        np.testing.assert_array_equal(col[name], expected)
    np.testing.assert_allclose(col["black_fraction"], (flat <= 5).mean(axis=1))
    np.testing.assert_allclose(col["saturated_fraction"], (flat >= 250).mean(axis=1))
    diffs = [np.abs(np.diff(img.astype(int), axis=a)).ravel() for img in images for a in (0, 1)]
    edge = [np.concatenate(diffs[2 * i : 2 * i + 2]).mean() for i in range(len(images))]
    np.testing.assert_allclose(col["edge_energy"], edge)


def test_features_matrix_is_chunked_and_shape_agnostic(monkeypatch) -> None:
    images = np.random.default_rng(1).integers(0, 256, (7, 1, 12, 12), dtype=np.uint8)
    whole = features_matrix(images)
    monkeypatch.setattr(ref_mod, "_CHUNK_PIXELS", 3 * 144)  # chunks of 3 images
    np.testing.assert_array_equal(features_matrix(images[:, 0]), whole)
    for i, image in enumerate(images[:, 0]):
        assert list(image_features(image).values()) == pytest.approx(list(whole[i]))


def test_wrong_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        features_matrix(np.zeros((2, 8, 8), np.float32))


def test_build_reference_samples_reproducibly() -> None:
    images = np.random.default_rng(2).integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    ref = build_reference(images, max_samples=10, seed=3)
    assert ref["features"] == list(FEATURES) and ref["n"] == 10 and ref["n_images"] == 40
    assert ref["image_size"] == 8
    assert all(len(v) == 10 for v in ref["samples"].values())
    assert build_reference(images, max_samples=10, seed=3) == ref
    assert build_reference(images, max_samples=10, seed=4) != ref
    # the sample is 10 distinct train images, each with its own features
    full = features_matrix(images)
    rows = np.array([ref["samples"][name] for name in FEATURES]).T
    matches = [int(np.flatnonzero((full == row).all(axis=1))[0]) for row in rows]
    assert len(set(matches)) == 10
    everything = build_reference(images, max_samples=613)
    assert everything["n"] == 40
    np.testing.assert_array_equal(everything["samples"]["mean"], full[:, 0])


def test_load_reference_round_trips(tmp_path: Path) -> None:
    ref = build_reference(np.random.default_rng(3).integers(0, 256, (5, 8, 8), dtype=np.uint8))
    path = tmp_path / REFERENCE_FILE
    path.write_text(json.dumps(ref))
    assert load_reference(path) == ref


def _broken(ref: dict, case: str) -> object:
    ref = json.loads(json.dumps(ref))
    if case == "not an object":
        return [1, 2]
    if case == "format":
        ref["format"] = 99
    elif case == "missing samples":
        del ref["samples"]
    elif case == "short list":
        ref["samples"]["mean"] = ref["samples"]["mean"][:-1]
    elif case == "unknown feature":
        ref["features"].append("kurtosis")
    elif case == "not a number":
        ref["samples"]["std"][0] = "x"
    elif case == "bad n":
        ref["n"] = 0
    return ref


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("not an object", "JSON object"),
        ("format", "format 99"),
        ("missing samples", "'samples' is missing"),
        ("short list", "samples of 'mean'"),
        ("unknown feature", "kurtosis"),
        ("not a number", "samples of 'std'"),
        ("bad n", "'n' must be"),
    ],
)
def test_load_reference_names_what_is_broken(tmp_path: Path, case: str, message: str) -> None:
    ref = build_reference(np.zeros((3, 4, 4), np.uint8))
    path = tmp_path / REFERENCE_FILE
    path.write_text(json.dumps(_broken(ref, case)))
    with pytest.raises(DataError, match=message) as info:
        load_reference(path)
    assert str(path) in info.value.message and "ctscan preprocess" in (info.value.fix or "")


def test_load_reference_refuses_bad_json_and_missing_file(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read the drift reference"):
        load_reference(tmp_path / "bad.json")
    with pytest.raises(DataError, match="no drift reference"):
        load_reference(tmp_path / "absent.json")


def test_preprocess_writes_the_reference_of_the_kept_train_split(
    raw_tree: Path, tmp_path: Path
) -> None:
    settings = Settings(data={"image_size": 32, "on_leak": "drop"})
    result = run_preprocess(settings, raw_tree, tmp_path / "processed", workers=0)
    store = load_store(result.store_dir)  # checks every file's size and sha256
    assert REFERENCE_FILE in store.meta["files"]
    reference = store.reference()
    assert reference is not None
    train = store.split("train").images.numpy()
    assert reference == build_reference(train)  # the kept train images, after the leak policy
    assert reference["n_images"] == store.counts["train"] and reference["image_size"] == 32
    assert load_reference(result.store_dir / REFERENCE_FILE) == reference


def test_a_store_without_reference_says_none(synthetic_store: Path) -> None:
    assert load_store(synthetic_store).reference() is None


def test_train_writes_the_best_models_calibrated_confidence_on_train(
    synthetic_store: Path, tmp_path: Path
) -> None:
    # The confidence the server shows is softmax(logits / T) with best.pt's temperature: the
    # reference is computed the same way (before calibration it was softmax(logits)).
    settings = engine_settings(synthetic_store, tmp_path / "runs", **{"train.epochs": 1})
    result = run_training(settings, out_dir=tmp_path / "run")
    assert result is not None
    saved = json.loads((result.run_dir / CONFIDENCE_FILE).read_text())
    train = load_store(synthetic_store).split("train")
    assert saved["n"] == len(train) == len(saved["confidence"])
    best = load_model(result.best_path)
    spec = best.spec
    logits = predict(
        best.model,
        train.images,
        mean=spec.mean,
        std=spec.std,
        channels=best.channels,
        rt=resolve_runtime(settings.train),
    )
    expected = probabilities(logits / best.temperature).max(axis=1)
    assert saved["temperature"] == best.temperature
    np.testing.assert_allclose(saved["confidence"], expected, rtol=1e-6)
    assert min(saved["confidence"]) >= 1 / 4 - 1e-9  # max of 4 probabilities
    from ctscan.serve.server import read_confidence_reference  # the server reads it back

    assert read_confidence_reference(result.run_dir / CONFIDENCE_FILE, best.temperature) == (
        pytest.approx(expected)
    )


def test_the_drift_reference_travels_with_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Served from another working directory (the relative paths.processed_dir finds no
    store), a checkpoint still has drift monitoring: its reference is beside it."""
    from fastapi.testclient import TestClient

    from ctscan.serve.app import create_app
    from ctscan.serve.monitoring import CONFIDENCE
    from ctscan.serve.server import build_service

    store = write_synthetic_store(tmp_path / "processed", reference=True)
    settings = engine_settings(store, tmp_path / "runs", **{"train.epochs": 1})
    result = run_training(settings, out_dir=tmp_path / "run")
    assert result is not None
    beside = result.run_dir / CONFIDENCE_FILE
    assert json.loads(beside.read_text())["features"] == load_store(store).reference()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    serving = load_settings([], ['serve.backend="torch"', 'train.device="cpu"'])
    assert not Path(serving.paths.processed_dir).exists()
    service = build_service(str(result.best_path), serving)
    assert service.monitor is not None and CONFIDENCE in service.monitor.tests
    with TestClient(create_app(service)) as client:
        assert client.get("/monitoring/drift").json()["available"] is True
    beside.unlink()  # no reference beside it, none in a store: off, and said at start-up
    with caplog.at_level(logging.WARNING, logger="ctscan.serve"):
        service = build_service(str(result.best_path), serving)
    said = [r.getMessage() for r in caplog.records if "drift" in r.getMessage()]
    assert service.monitor is None and len(said) == 1 and CONFIDENCE_FILE in said[0]
    with TestClient(create_app(service)) as client:
        body = client.get("/monitoring/drift").json()
    assert body["available"] is False and body["reason"] == service.drift_off

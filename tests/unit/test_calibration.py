"""Temperature scaling: the fit, where T is stored, every consumer showing softmax(logits / T).

The fit is a pure function (Hypothesis: it recovers a planted temperature, it scales with the
logits, the argmax never moves); the rest runs on the synthetic 32 px store: a checkpoint keeps T
and an older one reads as uncalibrated, the fit reads the validation split and never test,
`ctscan calibrate` rewrites the file and the drift reference, and evaluate, the Predictor, the
ONNX export and the server all answer with the calibrated probabilities.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

from ctscan.cli import app
from ctscan.data.reference import CONFIDENCE_FILE
from ctscan.data.store import Store, load_store
from ctscan.data.transforms import model_input
from ctscan.engine.calibration import fit_checkpoint, run_calibrate, validation_logits
from ctscan.engine.checkpoint import Checkpoint, load_model, read_checkpoint, save_checkpoint
from ctscan.engine.evaluate import evaluate_checkpoint, predict, probabilities
from ctscan.engine.metrics import classification_report
from ctscan.engine.modelling import Deployable
from ctscan.engine.runtime import resolve_runtime
from ctscan.engine.temperature import (
    T_MAX,
    T_MIN,
    apply_temperature,
    describe,
    fit_temperature,
    nll,
)
from ctscan.engine.train import run_training
from ctscan.errors import CheckpointError, CtscanError
from ctscan.inference import open_predictor
from ctscan.models import build_model
from ctscan.render import render_report
from tests.unit.conftest_store import engine_overrides, engine_settings

PLANTED_T = 2.5


def _sample_labels(logits: np.ndarray, temperature: float, rng: np.random.Generator) -> np.ndarray:
    """One label per row drawn from softmax(logits / temperature)."""
    p = probabilities(logits / temperature)
    cumulative = p.cumsum(axis=1)
    draws = rng.random((len(p), 1))
    return np.minimum((draws > cumulative).sum(axis=1), p.shape[1] - 1)


# ---- the fit (pure) ----------------------------------------------------------------------


@settings(max_examples=15, deadline=None)
@given(temperature=st.floats(0.25, 6.0), seed=st.integers(0, 2**32 - 1))
def test_the_fit_recovers_a_planted_temperature(temperature: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(20_000, 4)) * 3.0
    labels = _sample_labels(logits, temperature, rng)
    fit = fit_temperature(logits, labels)
    assert fit.status == "fitted" and fit.n == 20_000
    assert abs(math.log(fit.temperature / temperature)) < 0.12  # ~5 standard errors
    assert fit.nll_after == pytest.approx(nll(logits, labels, fit.temperature))
    assert fit.nll_after <= fit.nll_before
    for nearby in (fit.temperature * 0.98, fit.temperature * 1.02):  # a minimum
        assert nll(logits, labels, nearby) >= fit.nll_after


@settings(max_examples=25, deadline=None)
@given(scale=st.floats(0.3, 3.0), seed=st.integers(0, 2**32 - 1))
def test_scaling_the_logits_scales_the_temperature(scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(500, 4)) * 2.0
    labels = _sample_labels(logits, 1.0, rng)
    base, scaled = fit_temperature(logits, labels), fit_temperature(logits * scale, labels)
    if base.status == "fitted" and scaled.status == "fitted":
        assert scaled.temperature == pytest.approx(scale * base.temperature, rel=1e-5)


@settings(max_examples=50, deadline=None)
@given(
    temperature=st.floats(T_MIN, T_MAX),
    seed=st.integers(0, 2**32 - 1),
    spread=st.floats(0.5, 20.0),  # smaller: two logits may tie in float32 after / T
)
def test_the_temperature_never_moves_the_argmax(temperature: float, seed: int, spread: float):
    logits = torch.from_numpy(np.random.default_rng(seed).normal(size=(64, 4)) * spread).float()
    calibrated = probabilities(apply_temperature(logits, temperature))
    assert (calibrated.argmax(axis=1) == logits.argmax(dim=1).numpy()).all()
    np.testing.assert_allclose(calibrated.sum(axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize(
    ("seed", "planted", "expected"),
    [(0, 2.0, 1.8792222303783026), (1, 0.5, 0.5140052377833185)],
)
def test_the_fit_matches_the_former_golden_section_search(
    seed: int, planted: float, expected: float
) -> None:
    # `expected`: what the hand-written golden-section search (80 steps over log T) fitted on
    # these logits before scipy's bounded Brent search replaced it.
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(500, 4)) * 3.0
    labels = _sample_labels(logits, planted, rng)
    assert abs(fit_temperature(logits, labels).temperature - expected) < 1e-6


def test_degenerate_validation_sets_keep_or_clamp_the_temperature() -> None:
    empty = fit_temperature(np.zeros((0, 4)), np.zeros(0, dtype=np.int64))
    assert (empty.temperature, empty.status, empty.n) == (1.0, "empty", 0)
    flat = fit_temperature(np.zeros((5, 4)), [0, 1, 2, 3, 0])  # T changes nothing: keep 1
    assert (flat.temperature, flat.status) == (1.0, "fitted")
    # Perfectly separated (every image right): no optimum, T stays 1, and it says why.
    separated = fit_temperature(np.eye(4) * 3.0, np.arange(4))
    assert (separated.temperature, separated.status) == (1.0, "separated")
    assert "already right" in separated.note
    assert describe(1.0, separated.to_dict()).startswith("uncalibrated")
    # One class only: all right is separated; with an error it is fitted (and tiny: a note).
    one_class = np.array([[4.0, 0, 0, 0], [3.0, 0, 1, 0], [0, 2.0, 0, 0]])
    assert fit_temperature(one_class[:2], [0, 0]).status == "separated"
    tiny = fit_temperature(one_class, [0, 0, 0])
    assert tiny.status == "fitted" and T_MIN < tiny.temperature < T_MAX
    assert "only 3 validation images" in tiny.note
    # Worse than chance: the optimum is uniform probabilities, clamped to T_MAX.
    wrong = fit_temperature(np.eye(4)[[1, 2, 3, 0]] * 2.0, np.arange(4))
    assert (wrong.temperature, wrong.status) == (T_MAX, "at_bound")
    assert "clamped" in wrong.note
    assert (
        describe(wrong.temperature, wrong.to_dict())
        == "T = 20 (valid, 4 images, clamped at the bound)"
    )
    # Right by a hair everywhere but one: the optimum is below T_MIN, clamped to it.
    logits = np.zeros((100, 4))
    logits[np.arange(100), np.arange(100) % 4] = 0.01
    labels = np.arange(100) % 4
    labels[0] = 1
    low = fit_temperature(logits, labels)
    assert (low.temperature, low.status) == (T_MIN, "at_bound")
    assert low.nll_after < low.nll_before


def test_bad_inputs_are_value_errors() -> None:
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), [0])
    with pytest.raises(ValueError, match="shape"):
        fit_temperature(np.zeros((3, 4)), [0, 1])
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.zeros((2, 4)), [0, 4])


# ---- the checkpoint ----------------------------------------------------------------------


def _random_checkpoint(store: Store, seed: int = 0, **more: object) -> Checkpoint:
    torch.manual_seed(seed)
    model = build_model("cnn_gap", num_classes=4, image_size=store.spec.image_size)
    return Checkpoint(
        kind="best",
        model_name="cnn_gap",
        spec=store.spec,
        model_state=model.state_dict(),
        settings={"model": {"dropout": 0.2}},
        epoch=1,
        **more,
    )


def test_the_temperature_is_stored_and_read_back(synthetic_store: Path, tmp_path: Path) -> None:
    store = load_store(synthetic_store)
    report = {"method": "temperature", "split": "valid", "n": 16, "status": "fitted"}
    path = save_checkpoint(
        tmp_path / "c.pt", _random_checkpoint(store, temperature=1.7, calibration=report)
    )
    back = read_checkpoint(path)
    assert back.temperature == 1.7 and back.calibration == report
    assert back.calibration_text == "T = 1.7 (valid, 16 images)"
    assert load_model(path).deployable().temperature == 1.7


def test_a_checkpoint_without_a_temperature_reads_as_uncalibrated(
    synthetic_store: Path, tmp_path: Path
) -> None:
    payload = _random_checkpoint(load_store(synthetic_store)).to_payload()
    del payload["temperature"], payload["calibration"]
    torch.save(payload, tmp_path / "old.pt")
    old = read_checkpoint(tmp_path / "old.pt")
    assert old.temperature == 1.0 and old.calibration is None
    assert old.calibration_text == "uncalibrated"
    payload["format"] = 1  # the first format (raw weights in last.pt): refused in one line
    torch.save(payload, tmp_path / "v1.pt")
    with pytest.raises(CheckpointError, match=r"has format 1; this ctscan .* reads format 2"):
        read_checkpoint(tmp_path / "v1.pt")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), "hot", True])
def test_a_broken_temperature_is_refused(synthetic_store: Path, tmp_path: Path, bad) -> None:
    payload = _random_checkpoint(load_store(synthetic_store)).to_payload()
    payload["temperature"] = bad
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="temperature"):
        read_checkpoint(tmp_path / "bad.pt")


def test_deployable_returns_the_logits_divided_by_t(synthetic_store: Path) -> None:
    store = load_store(synthetic_store)
    loaded = load_model(_random_checkpoint(store, temperature=PLANTED_T))
    images = store.split("test").images
    spec = loaded.spec
    with torch.no_grad():
        raw = loaded.model(model_input(images, mean=spec.mean, std=spec.std, channels=1))
        calibrated = loaded.deployable()(images)
        plain = Deployable(loaded.model, spec, 1)(images)
    torch.testing.assert_close(calibrated, raw / PLANTED_T)
    assert torch.equal(plain, raw)
    assert torch.equal(calibrated.argmax(1), raw.argmax(1))
    with pytest.raises(ValueError, match="temperature"):
        Deployable(loaded.model, spec, 1, 0.0)


# ---- the fit on a checkpoint: the validation split, never test ---------------------------


def test_the_fit_reads_the_validation_split_and_never_test(
    synthetic_store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = load_store(synthetic_store)
    rt = resolve_runtime(engine_settings(synthetic_store, synthetic_store).train)
    ckpt = _random_checkpoint(store, temperature=3.0)  # a T held before is ignored
    read: list[str] = []
    original = Store.split

    def spy(self: Store, name: str):
        read.append(name)
        if name == "test":
            raise AssertionError("the calibration read the test split")
        return original(self, name)

    monkeypatch.setattr(Store, "split", spy)
    calibrated, report = fit_checkpoint(ckpt, store, rt)
    assert set(read) == {"valid"}
    monkeypatch.undo()
    logits, labels = validation_logits(_random_checkpoint(store), store, rt)
    expected = fit_temperature(logits, labels)
    assert calibrated.temperature == expected.temperature == report["temperature"]
    assert report["split"] == "valid" and report["n"] == len(store.split("valid")) == 16
    assert report["status"] == expected.status
    assert report["ece_before"] == pytest.approx(
        classification_report(labels, probabilities(logits), list(store.spec.class_names))["ece"]
    )
    assert all(torch.equal(calibrated.model_state[k], v) for k, v in ckpt.model_state.items())


# ---- a trained run -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(synthetic_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 2-epoch cnn_gap run with calibration on (the default) and the test evaluation."""
    out = tmp_path_factory.mktemp("calibration") / "run"
    settings = engine_settings(synthetic_store, out.parent / "runs", **{"train.epochs": 2})
    result = run_training(settings, out_dir=out)
    assert result is not None
    return result


def test_training_calibrates_best_pt_on_valid(trained, synthetic_store: Path) -> None:
    best, last = read_checkpoint(trained.best_path), read_checkpoint(trained.last_path)
    store = load_store(synthetic_store)
    rt = resolve_runtime(engine_settings(synthetic_store, synthetic_store).train)
    logits, labels = validation_logits(best, store, rt)
    assert best.temperature == pytest.approx(fit_temperature(logits, labels).temperature, rel=1e-6)
    assert best.calibration is not None and best.calibration["split"] == "valid"
    assert last.temperature == 1.0 and last.calibration is None  # last.pt: resumable, raw
    summary = trained.summary()
    assert summary["temperature"] == best.temperature
    assert summary["calibration"] == best.calibration["status"]
    test = summary["test"]
    assert {"ece", "log_loss", "ece_uncalibrated", "log_loss_uncalibrated"} <= set(test)
    assert 0.0 < test["ece_floor_p95"] < 1.0
    saved = json.loads((trained.run_dir / "eval-test" / "evaluation.json").read_text())
    assert saved["temperature"] == best.temperature
    assert saved["calibration"]["after"]["ece"] == saved["ece"]


def test_training_without_calibration_leaves_t_at_1(synthetic_store: Path, tmp_path: Path):
    extra = {"train.epochs": 1, "train.evaluate_test": "false", "train.calibrate": "false"}
    result = run_training(
        engine_settings(synthetic_store, tmp_path / "runs", **extra), out_dir=tmp_path / "run"
    )
    assert result is not None and result.calibration is None
    best = read_checkpoint(result.best_path)
    assert best.temperature == 1.0 and best.calibration_text == "uncalibrated"
    assert "temperature" not in result.summary()


@pytest.fixture(scope="module")
def planted(trained, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained best.pt with T set to PLANTED_T (a clearly visible temperature)."""
    ckpt = read_checkpoint(trained.best_path)
    report = {"method": "temperature", "split": "valid", "n": 16, "status": "fitted"}
    path = tmp_path_factory.mktemp("planted") / "run" / "best.pt"
    path.parent.mkdir()
    return save_checkpoint(
        path, dataclasses.replace(ckpt, temperature=PLANTED_T, calibration=report)
    )


def _raw_logits(checkpoint: Path, images: torch.Tensor) -> torch.Tensor:
    """The network's logits (no T), run as evaluate and the predictor run it."""
    rt = resolve_runtime(engine_settings(Path("store"), Path("runs")).train)
    loaded = load_model(checkpoint, device=rt.device, channels_last=rt.channels_last)
    spec = loaded.spec
    return predict(loaded.model, images, mean=spec.mean, std=spec.std, channels=1, rt=rt)


def test_evaluate_reports_ece_and_log_loss_before_and_after(
    planted: Path, synthetic_store: Path
) -> None:
    store = load_store(synthetic_store)
    rt = resolve_runtime(engine_settings(synthetic_store, synthetic_store).train)
    result = evaluate_checkpoint(planted, store=store, split="test", rt=rt, out_dir=None)
    test = store.split("test")
    raw = _raw_logits(planted, test.images)
    labels, names = test.labels.numpy(), list(store.spec.class_names)
    before = classification_report(labels, probabilities(raw), names)
    after = classification_report(labels, probabilities(raw / PLANTED_T), names)
    cal = result["calibration"]
    assert cal["temperature"] == result["temperature"] == PLANTED_T
    for key, report in (("before", before), ("after", after)):
        assert cal[key]["ece"] == pytest.approx(report["ece"])
        assert cal[key]["log_loss"] == pytest.approx(report["log_loss"])
        debiased = cal[key]["ece_debiased"]  # the same figure, with its 95 % interval
        assert debiased["estimate"] == pytest.approx(report["ece_debiased"]["estimate"], abs=1e-6)
        assert debiased["ci95"][0] <= debiased["estimate"] <= debiased["ci95"][1]
    assert (result["ece"], result["log_loss"]) == (cal["after"]["ece"], cal["after"]["log_loss"])
    assert result["accuracy"] == before["accuracy"] and result["macro_f1"] == before["macro_f1"]
    row = result["predictions"][0]
    assert list(row["probabilities"].values()) == pytest.approx(
        probabilities(raw[:1] / PLANTED_T)[0].tolist()
    )
    console = Console(record=True, width=160)
    console.print(render_report(result))
    text = console.export_text()
    assert "calibration on test" in text
    assert "before (T = 1)" in text and "after (T = 2.5)" in text
    assert f"{cal['before']['ece']:.4f}" in text and f"{cal['after']['log_loss']:.4f}" in text
    # the ECE a perfectly calibrated model would read here, for the calibrated confidences
    assert result["ece_floor"] == after["ece_floor"]
    floor = result["ece_floor"]
    row = next(line for line in text.splitlines() if "ece if calibrated (median, p95)" in line)
    assert f"{floor['median']:.4f}, {floor['p95']:.4f}" in row
    debiased = result["ece_debiased"]
    assert debiased == cal["after"]["ece_debiased"]  # the calibrated probabilities, top-level
    lines = text.splitlines()
    row = lines.index(next(line for line in lines if "ece debiased" in line))
    assert f"{debiased['estimate']:.4f}" in lines[row]
    assert f"{debiased['ci95'][0]:.4f}, {debiased['ci95'][1]:.4f}" in lines[row + 1]
    verdict = {True: "met", False: "missed", None: "cannot tell"}[debiased["meets_target"]]
    assert "0.03 target by it" in lines[row + 2] and verdict in lines[row + 2]


def test_the_predictor_shows_softmax_of_logits_over_t(planted: Path, synthetic_store: Path):
    settings = engine_settings(synthetic_store, synthetic_store)
    predictor = open_predictor(planted, settings=settings)
    assert predictor.info.temperature == PLANTED_T
    assert predictor.info.calibration == "T = 2.5 (valid, 16 images)"
    images = load_store(synthetic_store).split("test").images
    expected = probabilities(_raw_logits(planted, images) / PLANTED_T)
    np.testing.assert_allclose(predictor.probabilities(images.numpy()), expected, atol=1e-6)


@pytest.mark.slow
def test_the_onnx_export_holds_t(planted: Path, synthetic_store: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from ctscan.ops.export import read_onnx_metadata, run_export

    settings = engine_settings(synthetic_store, tmp_path / "runs")
    result = run_export(settings, planted, fmt="onnx", out=tmp_path / "m.onnx")
    assert result.error is None and result.parity[1].max_abs_diff <= 1e-4
    meta = read_onnx_metadata(tmp_path / "m.onnx")
    assert meta["temperature"] == PLANTED_T
    assert "divided by temperature 2.5" in meta["output"]["description"]
    onnx = open_predictor(tmp_path / "m.onnx", settings=settings)
    assert onnx.info.temperature == PLANTED_T and onnx.info.calibration.startswith("T = 2.5")
    images = load_store(synthetic_store).split("test").images
    raw = _raw_logits(planted, images)
    np.testing.assert_allclose(onnx.logits(images.numpy()), raw / PLANTED_T, atol=1e-4)
    np.testing.assert_allclose(
        onnx.probabilities(images.numpy()), probabilities(raw / PLANTED_T), atol=1e-5
    )


def test_an_old_export_without_t_is_uncalibrated() -> None:
    from ctscan.inference.predictor import _calibration_info

    assert _calibration_info({}, "old.onnx") == {"temperature": 1.0, "calibration": "uncalibrated"}
    with pytest.raises(CheckpointError, match="temperature"):
        _calibration_info({"temperature": -2}, "bad.onnx")


def test_the_server_answers_with_calibrated_probabilities(
    planted: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from ctscan.serve.app import create_app
    from ctscan.serve.server import build_service

    settings = engine_settings(synthetic_store, tmp_path / "runs", **{"serve.backend": '"torch"'})
    images = load_store(synthetic_store).split("test").images[:2]
    expected = probabilities(_raw_logits(planted, images) / PLANTED_T)
    buffer = io.BytesIO()
    Image.fromarray(images[0, 0].numpy()).save(buffer, format="PNG")
    with TestClient(create_app(build_service(str(planted), settings))) as client:
        body = client.post("/predict", files={"file": ("a.png", buffer.getvalue())}).json()
        assert list(body["probabilities"].values()) == pytest.approx(expected[0], abs=1e-5)
        assert body["model"]["temperature"] == PLANTED_T
        assert body["model"]["calibration"] == "T = 2.5 (valid, 16 images)"
        meta = client.get("/v2/models/ctscan").json()
        assert meta["parameters"]["temperature"] == PLANTED_T
        request = {
            "inputs": [
                {
                    "name": "image",
                    "datatype": "UINT8",
                    "shape": [2, 1, 32, 32],
                    "data": images.numpy().reshape(-1).tolist(),
                }
            ]
        }
        answer = client.post("/v2/models/ctscan/infer", json=request).json()
        got = np.array(answer["outputs"][0]["data"]).reshape(2, 4)
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_the_drift_reference_is_used_only_at_the_served_temperature(tmp_path: Path) -> None:
    from ctscan.serve.server import read_confidence_reference

    path = tmp_path / CONFIDENCE_FILE
    path.write_text(json.dumps({"confidence": [0.5, 0.9], "n": 2, "temperature": 2.0}))
    assert read_confidence_reference(path, 2.0) == [0.5, 0.9]
    assert read_confidence_reference(path, 1.0) is None  # written for another T: not compared
    path.write_text(json.dumps({"confidence": [0.5, 0.9], "n": 2}))  # before calibration
    assert read_confidence_reference(path, 1.0) == [0.5, 0.9]
    assert read_confidence_reference(path, 2.0) is None


@pytest.mark.parametrize(
    "body", ['{"confidence": []}', '{"confidence": ["x", null]}', '{"confidence": [NaN]}', "{"]
)
def test_a_broken_confidence_reference_turns_the_test_off_with_a_warning(
    tmp_path: Path, body: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-edited or broken reference_confidence.json is not used (the server still starts:
    it crashed on these before), and the log says why."""
    from ctscan.serve.server import read_confidence_reference

    path = tmp_path / CONFIDENCE_FILE
    path.write_text(body)
    with caplog.at_level("WARNING", logger="ctscan.serve"):
        assert read_confidence_reference(path, 1.0) is None
    assert "confidence drift test off" in caplog.text and str(path) in caplog.text


# ---- `ctscan calibrate` ----------------------------------------------------------------------


def _copy(path: Path, to: Path) -> Path:
    to.parent.mkdir(parents=True, exist_ok=True)
    to.write_bytes(path.read_bytes())
    return to


def test_calibrate_rewrites_in_place_and_keeps_the_training_state(
    trained, synthetic_store: Path, tmp_path: Path
) -> None:
    last = _copy(trained.last_path, tmp_path / "run" / "last.pt")
    settings = engine_settings(synthetic_store, tmp_path / "runs")
    result = run_calibrate(settings, last)
    back = read_checkpoint(last)
    store = load_store(synthetic_store)
    rt = resolve_runtime(settings.train)
    logits, labels = validation_logits(back, store, rt)
    assert back.temperature == result["temperature"]
    assert back.temperature == pytest.approx(fit_temperature(logits, labels).temperature, rel=1e-6)
    assert result["previous_temperature"] == 1.0 and back.resumable  # training state kept
    reference = json.loads((tmp_path / "run" / CONFIDENCE_FILE).read_text())
    train_logits = _raw_logits(last, store.split("train").images)
    expected = probabilities(apply_temperature(train_logits, back.temperature)).max(axis=1)
    assert reference["temperature"] == back.temperature
    np.testing.assert_allclose(reference["confidence"], expected, rtol=1e-6)
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_calibrate_out_leaves_the_source_alone(trained, synthetic_store: Path, tmp_path: Path):
    source = _copy(trained.best_path, tmp_path / "run" / "best.pt")
    before = source.read_bytes()
    settings = engine_settings(synthetic_store, tmp_path / "runs")
    elsewhere = run_calibrate(settings, source, out=tmp_path / "deploy" / "model.pt")
    assert source.read_bytes() == before
    assert read_checkpoint(tmp_path / "deploy" / "model.pt").temperature == elsewhere["temperature"]
    assert elsewhere["reference_confidence"] == str(tmp_path / "deploy" / CONFIDENCE_FILE)
    beside = run_calibrate(settings, source, out=tmp_path / "run" / "calibrated.pt")
    assert beside["reference_confidence"] is None  # the folder's reference belongs to best.pt
    assert not (tmp_path / "run" / CONFIDENCE_FILE).exists()
    for bad, words in ((tmp_path / "deploy", "is a folder"), (tmp_path / "x.onnx", "end in .pt")):
        with pytest.raises(CtscanError, match=words):
            run_calibrate(settings, source, out=bad)


def test_calibrate_cli_prints_the_fit(trained, synthetic_store: Path, tmp_path: Path) -> None:
    source = _copy(trained.best_path, tmp_path / "run" / "best.pt")
    sets = [arg for item in engine_overrides(synthetic_store, tmp_path) for arg in ("--set", item)]
    out = tmp_path / "out.pt"
    result = CliRunner().invoke(app, ["calibrate", str(source), "--out", str(out), "--json", *sets])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["checkpoint"] == str(out) and data["calibration"]["split"] == "valid"
    assert data["temperature"] == read_checkpoint(out).temperature
    table = CliRunner().invoke(app, ["calibrate", str(source), "--out", str(out), *sets])
    assert table.exit_code == 0, table.output
    assert "valid: 16 images" in table.stdout and str(out) in table.stdout
    floor = data["calibration"]["ece_floor_after"]  # what perfect calibration would read here
    assert 0.0 <= floor["median"] <= floor["p95"] <= 1.0
    assert "ece if calibrated (median, p95)" in table.stdout
    debiased = data["calibration"]["ece_debiased_after"]
    assert debiased["ci95"][0] <= debiased["estimate"] <= debiased["ci95"][1]
    assert debiased["bins"] == 8  # 16 validation images: at most N // 2 bins of 2
    assert "ece debiased" in table.stdout and "0.03 target by it" in table.stdout
    missing = CliRunner().invoke(app, ["calibrate", str(tmp_path / "nope.pt"), *sets])
    assert missing.exit_code != 0

"""`--backend openvino` on a tiny trained model: answers equal ONNX Runtime's at fp32, the
precision is reported, lower precisions run only where `ctscan export` accepted them, and every
refusal is one clear error."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctscan.data.store import load_store
from ctscan.errors import CheckpointError, CtscanError
from ctscan.inference import open_predictor
from ctscan.inference import predictor as predictor_module
from ctscan.ops import export
from ctscan.ops.backends import open_model
from ctscan.ops.export import read_onnx_metadata, run_export, set_onnx_metadata
from tests.processes import ctscan
from tests.serve_helpers import (
    ServeModel,
    live_server,
    png_bytes,
    sample_images,
    serve_model_fixture,  # noqa: F401  (the session's model)
)
from tests.unit.conftest_store import engine_overrides, engine_settings

ov = pytest.importorskip("openvino")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

# OpenVINO's and ONNX Runtime's fp32 kernels add in different orders: their logits differ in the
# last bits (1.2e-05 at most on efficientnet_lite0, docs/export.md). The bound is the one an
# export is held to against eager (export.FP32_TOLERANCE).
FP32_TOLERANCE = export.FP32_TOLERANCE


@pytest.fixture(scope="module")
def exported(trained: Path, synthetic_store: Path, tmp_path_factory: pytest.TempPathFactory):
    """`ctscan export --int8` with openvino installed: best.onnx, best.int8.onnx, their verdicts."""
    root = tmp_path_factory.mktemp("ov-export")
    settings = engine_settings(synthetic_store, root / "runs")
    result = run_export(settings, trained, int8=True, out=root / "best.onnx")
    assert result.error is None, result.error
    return result, root / "best.onnx", root / "best.int8.onnx", settings


def _without_verdict(source: Path, target: Path) -> Path:
    """A copy of an exported file with no `openvino` verdict in its metadata."""
    model = onnx.load(str(source))
    meta = read_onnx_metadata(source)
    meta.pop("openvino", None)
    set_onnx_metadata(model, meta)
    onnx.save_model(model, str(target))
    return target


def _accepted(path: Path) -> set[str]:
    verdicts = read_onnx_metadata(path).get("openvino", {})
    return {precision for precision, v in verdicts.items() if v["accepted"]}


def test_fp32_answers_equal_onnx_runtime_and_say_so(exported, tmp_path: Path) -> None:
    _, onnx_file, _, settings = exported
    plain = _without_verdict(onnx_file, tmp_path / "plain.onnx")  # no verdict: fp32 on any CPU
    images = load_store(settings.paths.processed_dir).split("test").images.numpy()
    on_ov = open_predictor(plain, settings=settings, backend="openvino")
    on_ort = open_predictor(plain, settings=settings)
    assert (on_ov.info.backend, on_ov.info.format, on_ov.info.precision) == (
        "openvino",
        "onnx",
        "fp32",
    )
    assert on_ort.info.backend == "onnx" and on_ort.info.precision == "fp32"
    assert on_ov.info.sha256 == on_ort.info.sha256 and on_ov.info.name == "cnn_gap"
    for batch in (1, 3, len(images)):  # the batch axis stays dynamic
        diff = np.abs(on_ov.logits(images[:batch]) - on_ort.logits(images[:batch])).max()
        assert diff <= FP32_TOLERANCE


def test_export_gates_openvinos_default_precision_and_predict_follows_it(exported) -> None:
    if "ONEDNN_MAX_CPU_ISA" in os.environ:  # the test below covers what the export does then
        pytest.skip("OpenVINO's oneDNN held to another ISA may not compile at the CPU's default")
    result, onnx_file, int8_file, settings = exported
    default = predictor_module.openvino_default_precision()
    rows = {row.format: row for row in result.parity}
    int8_verdicts = read_onnx_metadata(int8_file)["openvino"]
    assert "fp32" in int8_verdicts and f"onnx-int8 openvino {default}" in rows
    for precision, verdict in int8_verdicts.items():
        row = rows[f"onnx-int8 openvino {precision}"]
        assert (
            verdict["accepted"] == row.accepted == (export.int8_refusal(row, rows["eager"]) is None)
        )
        assert verdict["agreement"] == row.agreement and verdict["accuracy"] == row.accuracy
    if default == "fp32":  # no lower precision on this CPU: a float32 file needs no verdict
        assert "openvino" not in read_onnx_metadata(onnx_file)
    else:
        assert set(read_onnx_metadata(onnx_file)["openvino"]) == {default}
    for path in (onnx_file, int8_file):
        expected = default if default in _accepted(path) else "fp32"
        predictor = open_predictor(path, settings=settings, backend="openvino")
        assert predictor.info.precision == expected


@pytest.mark.parametrize(
    ("default", "verdicts", "expected", "logged"),
    [
        ("bf16", {"bf16": {"accepted": True}}, None, False),  # accepted: the default
        ("bf16", {"bf16": {"accepted": False}}, "fp32", True),  # refused: fp32, one line
        ("bf16", None, "fp32", True),  # never checked (a cached export): fp32, one line
        ("bf16", {"bf16": "yes"}, "fp32", True),  # not a verdict
        ("fp32", None, None, False),  # no lower precision here: nothing to gate
    ],
)
def test_a_lower_precision_runs_only_with_an_accepted_verdict(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    default: str,
    verdicts: dict | None,
    expected: str | None,
    logged: bool,
) -> None:
    monkeypatch.setattr(predictor_module, "openvino_default_precision", lambda: default)
    meta = {"format": "onnx"} | ({"openvino": verdicts} if verdicts is not None else {})
    with caplog.at_level(logging.WARNING):
        assert predictor_module._openvino_precision(meta, Path("m.onnx")) == expected
    assert ("runs 'm.onnx' at fp32" in caplog.text) == logged
    assert len(caplog.records) == int(logged)


def test_an_int8_file_without_an_accepted_verdict_is_refused(
    exported, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, int8_file, settings = exported
    plain = _without_verdict(int8_file, tmp_path / "plain.int8.onnx")
    with pytest.raises(CtscanError, match="int8 file with no accepted OpenVINO verdict") as info:
        open_model(plain, settings, "openvino")
    assert "pip install 'ctscan[openvino]'" in str(info.value.fix)
    assert "--backend onnx" in str(info.value.fix)
    assert open_model(plain, settings, "onnx").info.format == "onnx-int8"  # ORT's gate holds
    refused = {"format": "onnx-int8", "openvino": {"fp32": {"accepted": False}}}
    monkeypatch.setattr(predictor_module, "openvino_default_precision", lambda: "fp32")
    with pytest.raises(CtscanError, match="no accepted OpenVINO verdict at fp32"):
        predictor_module._openvino_precision(refused, plain)


def test_missing_openvino_names_the_extra_before_any_export(
    trained: Path, synthetic_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` raises ImportError
    settings = engine_settings(synthetic_store, tmp_path / "runs")
    with pytest.raises(CtscanError, match="needs openvino") as info:
        open_model(trained, settings, "openvino")
    assert "pip install 'ctscan[openvino]'" in str(info.value.fix)
    assert not (tmp_path / "runs" / export.CACHE_FOLDER).exists()  # nothing exported first
    # and `ctscan export` without openvino writes no verdict (nothing to gate with)
    result = run_export(settings, trained, out=tmp_path / "m.onnx")
    assert "openvino" not in read_onnx_metadata(tmp_path / "m.onnx")
    assert [row.format for row in result.parity] == ["eager", "onnx"]


def test_a_checkpoint_that_cannot_be_exported_is_an_error_not_torch(
    trained: Path,
    synthetic_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name)
    )
    settings = engine_settings(synthetic_store, tmp_path / "runs")
    with caplog.at_level(logging.WARNING), pytest.raises(CtscanError, match="needs onnxscript"):
        open_model(trained, settings, "openvino")
    assert "running on torch" not in caplog.text
    with pytest.raises(CtscanError, match="runs on torch, not openvino"):
        open_predictor(trained, settings=settings, backend="openvino")


def test_cli_predict_reports_backend_and_precision(
    exported, synthetic_store: Path, tmp_path: Path
) -> None:
    _, onnx_file, _, settings = exported
    image = tmp_path / "slice.png"
    Image.fromarray(load_store(synthetic_store).split("test").images[0, 0].numpy()).save(image)
    sets = [a for o in engine_overrides(synthetic_store, tmp_path / "runs") for a in ("--set", o)]
    done = ctscan(
        "predict", str(image), "--model", str(onnx_file), "--backend", "openvino", "--json", *sets
    )
    assert done.returncode == 0, done.stderr
    (row,) = [json.loads(line) for line in done.stdout.splitlines()]
    on_ov = open_predictor(onnx_file, settings=settings, backend="openvino")
    assert row["model"]["backend"] == "openvino"
    assert row["model"]["precision"] == on_ov.info.precision
    assert row["label"] == on_ov.predict_files([image])[0].label


def test_a_model_openvino_cannot_compile_here_is_one_line_and_the_export_still_writes(
    exported, trained: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    """OpenVINO held to AVX2 kernels on a bf16 CPU (ONEDNN_MAX_CPU_ISA, as a suite run that
    imitates an AVX2 machine sets it) has no bf16 max-pool: the model does not compile. The
    export gate is optional, so the export writes its file with a warning and no verdict; a
    predict on OpenVINO is one line naming ONNX Runtime as the way out, not a traceback."""
    if predictor_module.openvino_default_precision() == "fp32":
        pytest.skip("this CPU computes in fp32 by default: the bf16 kernels are never asked for")
    if "ONEDNN_MAX_CPU_ISA" in os.environ:
        pytest.skip("the suite runs held to another ISA: `exported` could not be checked at bf16")
    _, onnx_file, _, _ = exported
    capped = {"ONEDNN_MAX_CPU_ISA": "AVX2"}
    sets = [a for o in engine_overrides(synthetic_store, tmp_path / "runs") for a in ("--set", o)]
    out = tmp_path / "capped.onnx"
    done = ctscan("export", str(trained), "--out", str(out), *sets, env=capped)
    assert done.returncode == 0, done.stderr
    assert "OpenVINO cannot compile the model on this CPU" in done.stderr
    assert "openvino" not in read_onnx_metadata(out)  # no verdict: fp32 on OpenVINO, or refused
    image = tmp_path / "slice.png"
    Image.fromarray(load_store(synthetic_store).split("test").images[0, 0].numpy()).save(image)
    model = ("--model", str(onnx_file), "--backend", "openvino")  # its bf16 verdict: accepted
    done = ctscan("predict", str(image), *model, *sets, env=capped)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "OpenVINO cannot compile the model on this CPU (bf16 precision)" in done.stderr
    assert "--backend onnx" in done.stderr


def test_serve_on_openvino_answers_predict(serve_model: ServeModel, tmp_path: Path) -> None:
    """The checkpoint's cached export holds no verdict: served at fp32, as ONNX Runtime answers."""
    image = sample_images(1, seed=3)[0]
    reference = open_predictor(
        serve_model.onnx, settings=engine_settings(serve_model.store, tmp_path)
    )
    expected = reference.probabilities(image[None, None])[0]
    with (
        live_server(
            serve_model.checkpoint, runs_dir=serve_model.runs_dir, args=("--backend", "openvino")
        ) as server,
        server.client() as client,
    ):
        ready = client.get("/ready").json()["model"]
        response = client.post("/predict", files={"file": ("a.png", png_bytes(image))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (ready["backend"], ready["format"], ready["precision"]) == ("openvino", "onnx", "fp32")
    assert body["model"] == ready
    assert np.abs(np.array(list(body["probabilities"].values())) - expected).max() <= FP32_TOLERANCE


def test_a_bad_or_foreign_onnx_file_is_one_checkpoint_error(tmp_path: Path, exported) -> None:
    helper, uint8, float32 = onnx.helper, onnx.TensorProto.UINT8, onnx.TensorProto.FLOAT
    settings = exported[3]
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        open_predictor(garbage, settings=settings, backend="openvino")
    x = helper.make_tensor_value_info("images", uint8, ["batch", 1, 4, 4])
    y = helper.make_tensor_value_info("logits", float32, ["batch", 16])
    nodes = [helper.make_node("Cast", ["images"], ["f"], to=float32)]
    nodes.append(helper.make_node("Flatten", ["f"], ["logits"]))
    foreign = tmp_path / "foreign.onnx"  # a valid model without ctscan's metadata
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [x], [y])), str(foreign))
    with pytest.raises(CheckpointError, match="without ctscan metadata"):
        open_predictor(foreign, settings=settings, backend="openvino")


def test_predictors_that_come_and_go_leave_signals_working(exported) -> None:
    """OpenVINO's CPU plugin swaps the thread's signal stack per Core: two Cores freed in the
    order they were made left it on a freed buffer, and the next Ctrl-C was a SIGSEGV (-11)."""
    _, onnx_file, _, _ = exported
    script = (
        "import gc, signal, sys\n"
        "from ctscan.inference.predictor import openvino_call\n"
        "first = openvino_call(sys.argv[1], 1, 'fp32')\n"
        "second = openvino_call(sys.argv[1], 1, 'fp32')\n"
        "del first; gc.collect(); del second; gc.collect()\n"
        "signal.signal(signal.SIGINT, lambda *_: print('handled'))\n"
        "signal.raise_signal(signal.SIGINT)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(onnx_file)], capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout) == (0, "handled\n"), done.stderr[-2000:]

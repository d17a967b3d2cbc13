"""`ctscan export` on a tiny trained model: ONNX / int8 / .pt2 round trips, metadata, refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ctscan.data.store import load_store
from ctscan.engine.checkpoint import file_sha256, load_model, read_checkpoint
from ctscan.errors import CheckpointError, CtscanError, DataError
from ctscan.inference import open_predictor
from ctscan.ops import export
from ctscan.ops.backends import open_model
from ctscan.ops.export import (
    ExportResult,
    int8_refusal,
    plan_outputs,
    read_onnx_metadata,
    run_export,
    triton_config,
)
from tests.processes import ctscan_in_process
from tests.unit.conftest_store import engine_overrides, engine_settings, write_synthetic_store

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

META_KEYS = {
    "model_name",
    "class_names",
    "preprocess",
    "ctscan_version",
    "checkpoint_sha256",
    "format",
    "opset",
    "input",
    "output",
}


@dataclass
class Exported:
    result: ExportResult
    folder: Path
    triton: Path
    checkpoint: Path
    store: Path


@pytest.fixture(scope="module")
def exported(
    trained: Path, synthetic_store: Path, tmp_path_factory: pytest.TempPathFactory
) -> Exported:
    """One `--format all --int8 --triton` export, shared by the round-trip tests."""
    root = tmp_path_factory.mktemp("exported")
    settings = engine_settings(synthetic_store, root / "runs")
    result = run_export(
        settings,
        trained,
        fmt="all",
        int8=True,
        out=root / "models",
        triton_dir=root / "triton",
    )
    return Exported(result, root / "models", root / "triton", trained, synthetic_store)


def _settings(store: Path, tmp_path: Path):
    return engine_settings(store, tmp_path / "runs")


def _eager_logits(checkpoint: Path, images: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return load_model(checkpoint).deployable()(images).numpy()


def _no_temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


# ---- planning and refusals before any export (fast) ----------------------------------------


def test_default_paths_sit_beside_the_checkpoint(tmp_path: Path) -> None:
    ckpt = tmp_path / "run" / "best.pt"
    ckpt.parent.mkdir()
    plan = plan_outputs(ckpt, fmt="all", int8=True)
    assert (plan.onnx, plan.int8, plan.pt2) == (
        tmp_path / "run" / "best.onnx",
        tmp_path / "run" / "best.int8.onnx",
        tmp_path / "run" / "best.pt2",
    )
    single = plan_outputs(ckpt, fmt="onnx", out=tmp_path / "deploy" / "m.onnx", int8=True)
    assert single.onnx == tmp_path / "deploy" / "m.onnx"
    assert single.int8 == tmp_path / "deploy" / "m.int8.onnx"
    assert single.pt2 is None
    only_pt2 = plan_outputs(ckpt, fmt="pt2")
    assert (only_pt2.onnx, only_pt2.int8, only_pt2.pt2) == (
        None,
        None,
        tmp_path / "run" / "best.pt2",
    )


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"fmt": "tflite"}, "is not one of onnx, pt2, all"),
        ({"fmt": "pt2", "int8": True}, "--int8 works on the ONNX model"),
        ({"fmt": "pt2", "triton_dir": Path("t")}, "--triton works on the ONNX model"),
        ({"fmt": "onnx", "out": Path("model.bin")}, "does not end in .onnx"),
        ({"fmt": "all", "out": Path("model.onnx")}, "looks like a file"),
    ],
)
def test_bad_options_are_one_clear_error(
    tmp_path: Path, kwargs: dict[str, object], says: str
) -> None:
    if isinstance(kwargs.get("out"), Path):
        kwargs = {**kwargs, "out": tmp_path / kwargs["out"]}  # type: ignore[operator]
    with pytest.raises(CtscanError, match=says) as info:
        plan_outputs(tmp_path / "best.pt", **kwargs)  # type: ignore[arg-type]
    assert info.value.fix


def test_out_under_a_file_or_naming_a_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CtscanError, match="is a file, not a folder"):
        plan_outputs(tmp_path / "best.pt", fmt="onnx", out=tmp_path / "file.txt" / "m.onnx")
    with pytest.raises(CtscanError, match="is a folder; for --format onnx it names the file"):
        plan_outputs(tmp_path / "best.pt", fmt="onnx", out=tmp_path)
    with pytest.raises(CtscanError, match="is a file, not a folder"):
        plan_outputs(tmp_path / "best.pt", fmt="all", out=tmp_path / "file.txt")


def test_checkpoint_missing_or_a_folder(
    trained: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    settings = _settings(synthetic_store, tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        run_export(settings, tmp_path / "nope.pt", out=tmp_path / "m.onnx")
    with pytest.raises(CheckpointError, match="is a folder, not a checkpoint file") as info:
        run_export(settings, trained.parent, out=tmp_path / "m.onnx")
    assert "best.pt" in str(info.value.fix)
    assert not list(tmp_path.glob("*.onnx"))


def test_store_with_another_spec_is_refused(
    trained: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    other = write_synthetic_store(tmp_path / "other", size=48)
    settings = _settings(other, tmp_path)
    with pytest.raises(DataError, match="takes images preprocessed as 32 px") as info:
        run_export(settings, trained, out=tmp_path / "m.onnx")
    assert "holds 48 px" in info.value.message  # the store it was trained on is still there:
    assert f"pass `--set paths.processed_dir={synthetic_store}`." in str(info.value.fix)
    assert not (tmp_path / "m.onnx").exists()
    assert _no_temp_files(tmp_path) == []


def test_missing_export_extra_names_it(
    trained: Path, synthetic_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxscript" else real(name)
    )
    with pytest.raises(CtscanError, match="needs onnxscript") as info:
        run_export(_settings(synthetic_store, tmp_path), trained, out=tmp_path / "m.onnx")
    assert "pip install 'ctscan[export]'" in str(info.value.fix)


def test_int8_rule() -> None:
    eager = export.Parity("eager", Path("best.pt"), 0.0, 1.0, 0.90)
    ok = export.Parity("onnx-int8", Path("i.onnx"), 0.3, 0.985, 0.895)
    assert int8_refusal(ok, eager) is None
    disagrees = export.Parity("onnx-int8", Path("i.onnx"), 0.3, 0.97, 0.90)
    assert "agrees with eager on 97.0%" in str(int8_refusal(disagrees, eager))
    loses = export.Parity("onnx-int8", Path("i.onnx"), 0.3, 0.99, 0.885)
    assert "1.5 points below" in str(int8_refusal(loses, eager))


# ---- Triton ------------------------------------------------------------------------------


def _model_config(text: str):
    """`text` parsed with Triton's own schema: an unknown field or enum value is an error."""
    from google.protobuf import text_format

    model_config_pb2 = pytest.importorskip(
        "tritonclient.grpc.model_config_pb2", reason="pip install 'tritonclient[grpc]'"
    )
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_triton_config_parses_as_tritons_model_config() -> None:
    from google.protobuf import text_format

    text = triton_config("ctscan-cnn_gap", image_size=64, num_classes=4, max_batch_size=16)
    config = _model_config(text)
    types = type(config.input[0]).DESCRIPTOR.fields_by_name["data_type"].enum_type.values_by_name
    assert config.name == "ctscan-cnn_gap"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    (inp,) = config.input
    assert (inp.name, inp.data_type, list(inp.dims)) == (
        "images",
        types["TYPE_UINT8"].number,
        [1, 64, 64],
    )
    (out,) = config.output
    assert (out.name, out.data_type, list(out.dims)) == ("logits", types["TYPE_FP32"].number, [4])
    assert out.label_filename == "labels.txt"
    assert config.dynamic_batching.max_queue_delay_microseconds > 0
    misspelt = {"label_filename": "labels_filename", "TYPE_UINT8": "UINT8", "dims": "shape"}
    for right, wrong in misspelt.items():
        with pytest.raises(text_format.ParseError, match=wrong):
            _model_config(text.replace(right, wrong))


# ---- one real export, shared (slow: torch.export + ONNX + quantisation) --------------------


@pytest.mark.slow
def test_onnx_matches_eager_on_the_test_images(exported: Exported, tmp_path: Path) -> None:
    settings = _settings(exported.store, tmp_path)
    images = load_store(exported.store).split("test").images.numpy()
    onnx_logits = open_predictor(exported.folder / "best.onnx", settings=settings).logits(images)
    eager = open_predictor(exported.checkpoint, settings=settings, backend="torch")
    assert np.abs(onnx_logits - eager.logits(images)).max() <= 1e-4
    rows = {row.format: row for row in exported.result.parity}
    # (with openvino installed, its rows follow: tests/unit/test_openvino.py)
    assert {name for name in rows if " openvino " not in name} == {
        "eager",
        "onnx",
        "pt2",
        "onnx-int8",
    }
    assert rows["onnx"].max_abs_diff <= 1e-4 and rows["onnx"].agreement == 1.0
    assert exported.result.error is None and rows["onnx-int8"].accepted
    assert exported.result.opset == export.OPSET


def _predict_in_a_process(*args: str) -> tuple[list[dict], bool]:
    """`ctscan predict ARGS --json` in a new interpreter: (its rows, whether it imported torch)."""
    code = (
        "import sys\n"
        "from ctscan.cli import main\n"
        "sys.argv = ['ctscan', 'predict', *sys.argv[1:], '--json']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "print('torch' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    return rows, done.stderr.splitlines()[-1] == "True"


def test_an_onnx_prediction_does_not_import_torch(exported: Exported, tmp_path: Path) -> None:
    """torch's import was 3 of the 5.4 s an ONNX `ctscan predict` of one image took."""
    image = tmp_path / "slice.png"
    Image.fromarray(load_store(exported.store).split("test").images[0, 0].numpy()).save(image)
    rows, torch_imported = _predict_in_a_process(
        str(image), "--model", str(exported.folder / "best.onnx")
    )
    assert not torch_imported and rows[0]["label"] in rows[0]["probabilities"]


def test_predict_runs_a_checkpoint_on_its_cached_export_without_torch_the_second_time(
    trained: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    """The first `ctscan predict --model best.pt` exports it into the cache; the next answers
    from the cached file without importing torch; both agree with --backend torch to 1e-4."""
    images = load_store(synthetic_store).split("test").images[:4, 0].numpy()
    files = []
    for i, image in enumerate(images):
        files.append(str(tmp_path / f"slice{i}.png"))
        Image.fromarray(image).save(files[-1])
    args = [*files, "--model", str(trained)]
    args += [
        a for item in engine_overrides(synthetic_store, tmp_path / "runs") for a in ("--set", item)
    ]
    first, first_torch = _predict_in_a_process(*args)
    cached = list((tmp_path / "runs" / export.CACHE_FOLDER).iterdir())
    assert first_torch and [p.name for p in cached] == [f"{file_sha256(trained)[:24]}.onnx"]
    second, second_torch = _predict_in_a_process(*args)
    eager_out = ctscan_in_process("predict", *args, "--backend", "torch", "--json").stdout
    eager = [json.loads(line) for line in eager_out.splitlines()]  # its process is not the point
    assert not second_torch and second == first
    assert {r["model"]["backend"] for r in first} == {"onnx"}
    assert {r["model"]["backend"] for r in eager} == {"torch"}
    for onnx_row, eager_row in zip(second, eager, strict=True):
        assert onnx_row["label"] == eager_row["label"]
        for name, p in eager_row["probabilities"].items():
            assert abs(onnx_row["probabilities"][name] - p) <= 1e-4


@pytest.mark.slow
def test_an_export_that_differs_is_not_cached_and_auto_falls_back_to_torch(
    trained: Path,
    synthetic_store: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(export, "FP32_TOLERANCE", -1.0)  # every difference is too large
    settings = _settings(synthetic_store, tmp_path)
    with pytest.raises(CtscanError, match="nothing was written"):
        open_model(trained, settings, "onnx")
    assert list((tmp_path / "runs" / export.CACHE_FOLDER).iterdir()) == []  # no temp file either
    with caplog.at_level("WARNING"):
        predictor = open_model(trained, settings, "auto")
    assert predictor.info.backend == "torch" and "running on torch" in caplog.text


@pytest.mark.slow
def test_an_export_starts_from_the_cached_file_only_when_it_is_the_same_export(
    trained: Path, synthetic_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An export fills the serve cache of an existing runs folder; the next export of that
    checkpoint copies the file (torch.onnx.export takes 7-10 s), unless its metadata is not what
    this export writes (then it exports anew)."""
    settings = _settings(synthetic_store, tmp_path)
    (tmp_path / "runs").mkdir()
    first = run_export(settings, trained, out=tmp_path / "a" / "best.onnx")
    cache = export.cache_path(settings, file_sha256(trained))
    meta = export.read_onnx_metadata(cache)
    exported_meta = export.read_onnx_metadata(tmp_path / "a" / "best.onnx")
    assert meta == {k: v for k, v in exported_meta.items() if k != "openvino"}
    calls, real = [], export.write_onnx
    monkeypatch.setattr(export, "write_onnx", lambda *a, **k: calls.append(1) or real(*a, **k))
    second = run_export(settings, trained, out=tmp_path / "b" / "best.onnx")
    assert calls == [] and second.opset == first.opset
    assert [(r.format, r.agreement) for r in second.parity] == [
        (r.format, r.agreement) for r in first.parity
    ]
    model = onnx.load(str(cache))
    export.set_onnx_metadata(model, meta | {"ctscan_version": "0.0.0"})  # an older ctscan's
    onnx.save_model(model, str(cache))
    run_export(settings, trained, out=tmp_path / "c" / "best.onnx")
    assert calls == [1]
    assert export.read_onnx_metadata(tmp_path / "c" / "best.onnx")["ctscan_version"] != "0.0.0"


@pytest.mark.slow
def test_onnx_graph_takes_uint8_with_a_dynamic_batch(exported: Exported) -> None:
    path = exported.folder / "best.onnx"
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    (inp,) = model.graph.input
    assert inp.name == "images"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [1, 32, 32]
    (out,) = model.graph.output
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images = load_store(exported.store).split("test").images
    for batch in (1, 5):
        x = images[:batch]
        got = session.run(None, {"images": x.numpy()})[0]
        assert got.shape == (batch, 4)
        assert np.abs(got - _eager_logits(exported.checkpoint, x)).max() <= 1e-4


@pytest.mark.slow
def test_metadata_is_present_and_complete(exported: Exported) -> None:
    ckpt = read_checkpoint(exported.checkpoint)
    sha = file_sha256(exported.checkpoint)
    for name, fmt in (("best.onnx", "onnx"), ("best.int8.onnx", "onnx-int8")):
        meta = read_onnx_metadata(exported.folder / name)
        assert set(meta) >= META_KEYS
        assert meta["format"] == fmt and meta["model_name"] == "cnn_gap"
        assert meta["preprocess"] == ckpt.spec.to_dict()
        assert meta["class_names"] == list(ckpt.class_names)
        assert meta["checkpoint_sha256"] == sha
        assert meta["input"]["dtype"] == "uint8" and meta["input"]["shape"][1:] == [1, 32, 32]
        model = onnx.load(str(exported.folder / name))
        assert meta["opset"] == export.onnx_opset(model) == export.OPSET
    int8_meta = read_onnx_metadata(exported.folder / "best.int8.onnx")
    assert int8_meta["quantization"]["format"] == "QDQ"
    assert int8_meta["quantization"]["per_channel"] is True
    extra = {"ctscan.json": ""}
    torch.export.load(str(exported.folder / "best.pt2"), extra_files=extra)
    pt2_meta = json.loads(extra["ctscan.json"])
    assert pt2_meta["format"] == "pt2" and pt2_meta["checkpoint_sha256"] == sha


@pytest.mark.slow
def test_int8_file_is_quantised_and_opens_as_int8(exported: Exported, tmp_path: Path) -> None:
    path = exported.folder / "best.int8.onnx"
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert path.stat().st_size < (exported.folder / "best.onnx").stat().st_size / 2
    predictor = open_predictor(path, settings=_settings(exported.store, tmp_path))
    assert predictor.info.format == "onnx-int8"
    assert predictor.info.sha256 == file_sha256(exported.checkpoint)


@pytest.mark.slow
def test_pt2_round_trip_equals_eager(exported: Exported) -> None:
    module = torch.export.load(str(exported.folder / "best.pt2")).module()
    images = load_store(exported.store).split("test").images
    for batch in (1, 3, len(images)):
        with torch.no_grad():
            got = module(images[:batch]).numpy()
        assert np.abs(got - _eager_logits(exported.checkpoint, images[:batch])).max() <= 1e-5


@pytest.mark.slow
def test_triton_layout_and_no_temp_files(exported: Exported) -> None:
    model_dir = exported.result.triton_model_dir
    assert model_dir == exported.triton / "ctscan-cnn_gap"
    assert (model_dir / "1" / "model.onnx").read_bytes() == (
        exported.folder / "best.onnx"
    ).read_bytes()
    assert (model_dir / "labels.txt").read_text().split() == list(
        read_checkpoint(exported.checkpoint).class_names
    )
    # What Triton reads: <repository>/<model>/config.pbtxt naming the folder, the model in a
    # numbered version folder (<model>/<version>/model.onnx for onnxruntime_onnx), the inputs
    # and outputs of the config those of the ONNX graph.
    config = _model_config((model_dir / "config.pbtxt").read_text())
    assert config.name == model_dir.name and config.platform == "onnxruntime_onnx"
    versions = [p for p in model_dir.iterdir() if p.is_dir()]
    assert [p.name for p in versions] == ["1"] and (versions[0] / "model.onnx").is_file()
    graph = onnx.load(str(versions[0] / "model.onnx")).graph
    elem = onnx.TensorProto.DataType
    for declared, (tensor,), onnx_type in (
        (config.input, graph.input, "UINT8"),
        (config.output, graph.output, "FLOAT"),
    ):
        (entry,) = declared
        shape = [d.dim_value or -1 for d in tensor.type.tensor_type.shape.dim]
        assert entry.name == tensor.name and tensor.type.tensor_type.elem_type == elem.Value(
            onnx_type
        )
        assert [-1, *entry.dims] == shape  # Triton adds the batch axis (max_batch_size > 0)
    assert config.output[0].label_filename == "labels.txt"
    assert (model_dir / "config.pbtxt").stat().st_mode & 0o044  # readable by the server's user
    assert sorted(p.name for p in exported.folder.iterdir()) == [
        "best.int8.onnx",
        "best.onnx",
        "best.pt2",
        "reference_confidence.json",  # the drift reference travels with the exported files
    ]
    assert _no_temp_files(exported.folder) == [] and _no_temp_files(exported.triton) == []
    assert exported.result.paths[:3] == [
        exported.folder / "best.onnx",
        exported.folder / "best.pt2",
        exported.folder / "best.int8.onnx",
    ]


@pytest.mark.slow
def test_refused_int8_leaves_no_file_and_keeps_fp32(
    trained: Path, synthetic_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "INT8_MIN_AGREEMENT", 1.01)  # no model can agree on 101%
    out = tmp_path / "deploy" / "model.onnx"
    result = run_export(_settings(synthetic_store, tmp_path), trained, int8=True, out=out)
    assert isinstance(result.error, CtscanError)
    assert "int8 model was refused" in str(result.error)
    assert out.is_file() and not (tmp_path / "deploy" / "model.int8.onnx").exists()
    assert result.paths == [out, out.parent / "reference_confidence.json"]  # drift reference
    (row,) = [row for row in result.parity if row.format == "onnx-int8"]
    assert not row.accepted
    # OpenVINO's runs (openvino installed) are held to the same rule: refused as well
    assert not any(row.accepted for row in result.parity if " openvino " in row.format)
    assert _no_temp_files(tmp_path / "deploy") == []


@pytest.mark.slow
def test_fp32_beyond_tolerance_writes_nothing(
    trained: Path, synthetic_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export, "FP32_TOLERANCE", -1.0)  # every difference is too large
    out = tmp_path / "deploy" / "model.pt2"
    with pytest.raises(CtscanError, match="nothing was written"):
        run_export(_settings(synthetic_store, tmp_path), trained, fmt="pt2", out=out)
    assert list((tmp_path / "deploy").iterdir()) == []


@pytest.mark.slow
def test_cli_writes_the_file_and_prints_parity(
    trained: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cli" / "model.onnx"
    sets = [a for o in engine_overrides(synthetic_store, tmp_path / "runs") for a in ("--set", o)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    proc = subprocess.run(
        [sys.executable, "-m", "ctscan", "export", str(trained), "--out", str(out), *sets],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "120"},
    )
    assert proc.returncode == 0, proc.stderr
    assert out.is_file()
    assert "max |Δlogit|" in proc.stdout and "onnx" in proc.stdout
    written = [str(out), str(out.parent / "reference_confidence.json")]  # + the drift reference
    assert proc.stdout.strip().splitlines()[-2:] == written
    bad = subprocess.run(
        [sys.executable, "-m", "ctscan", "export", str(trained.parent), *sets],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 4
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr


@pytest.mark.slow
def test_int8_keeps_the_named_parts_in_fp32(exported: Exported, tmp_path: Path) -> None:
    fp32 = exported.folder / "best.onnx"
    images = load_store(exported.store).split("train").images.numpy()
    path = tmp_path / "kept.int8.onnx"
    settings = export.quantize_onnx(fp32, path, images, meta={}, keep_fp32=("stem", "head"))
    assert settings["fp32_parts"] == ["stem", "head"]
    graph = onnx.load(str(path)).graph
    made_by = {out: node.op_type for node in graph.node for out in node.output}
    weighted = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    # a quantised node reads its weight through DequantizeLinear, a float32 one reads it plainly
    weight_from = [made_by.get(node.input[1], "initializer") for node in weighted]
    assert weight_from[0] != "DequantizeLinear" and weight_from[-1] != "DequantizeLinear"
    assert set(weight_from[1:-1]) == {"DequantizeLinear"}
    with pytest.raises(ValueError, match="unknown parts"):
        export.fp32_node_names(onnx.load(str(fp32)), ("neck",))


def test_parity_table_keeps_every_figure_and_name_whole_in_80_columns():
    """The widest rows (OpenVINO's, a refusal note) in an 80-column terminal: rich may fold a
    name or wrap a note, but no figure, format or file name is cut to an ellipsis."""
    from rich.console import Console

    from ctscan.ops.export import ExportResult, Parity
    from ctscan.render import render_parity

    note = "refused: 97.3% agreement < 98% (needs 98%)"
    rows = [
        Parity("eager", Path("best.pt"), 0.0, 1.0, 0.9459),
        Parity(
            "onnx-int8 openvino bf16", Path("best.int8.onnx"), 0.31, 0.9923, 0.9459, False, note
        ),
    ]
    console = Console(width=80, record=True)
    console.print(
        render_parity(ExportResult(Path("best.pt"), "efficientnet_lite0", 259, 18, rows, []))
    )
    text = console.export_text()
    assert "…" not in text  # rich's mark of a cut cell
    for figure in ("3.10e-01", "99.23%", "94.59%", "100.00%"):
        assert figure in text

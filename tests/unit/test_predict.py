"""`ctscan predict` and the Predictor on a tiny trained model: rows, errors, JSON, CSV, overlays."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctscan.data.store import load_store
from ctscan.engine.evaluate import evaluate_checkpoint
from ctscan.engine.runtime import resolve_runtime
from ctscan.errors import CheckpointError, CtscanError, DataError
from ctscan.inference import open_predictor
from ctscan.inference.batch import collect_inputs
from tests.unit.conftest_store import engine_overrides, engine_settings


@pytest.fixture(scope="module")
def slice_pngs(synthetic_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The store's test split written as PNG files in class folders (nested, for recursion)."""
    folder = tmp_path_factory.mktemp("pngs")
    data = load_store(synthetic_store).split("test")
    for i, rel in enumerate(data.paths):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(data.images[i, 0].numpy()).save(path)
    return folder


def _settings(store: Path, tmp_path: Path):
    return engine_settings(store, tmp_path / "runs")


def test_predictor_matches_evaluate_on_every_file(
    trained: Path, slice_pngs: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    settings = _settings(synthetic_store, tmp_path)
    predictor = open_predictor(trained, settings=settings)
    assert predictor.info.format == "checkpoint" and predictor.info.name == "cnn_gap"
    assert len(predictor.info.sha256) == 64
    store = load_store(synthetic_store)
    report = evaluate_checkpoint(
        trained, store=store, split="test", rt=resolve_runtime(settings.train), out_dir=None
    )
    by_path = {row["path"]: row for row in report["predictions"]}
    files = collect_inputs([slice_pngs])
    assert len(files) == len(by_path) == 16
    for prediction in predictor.predict_files(files):
        row = by_path[str(Path(prediction.path).relative_to(slice_pngs))]
        assert prediction.label == row["label"]
        for name, p in row["probabilities"].items():
            assert abs(prediction.probabilities[name] - p) <= 1e-5


@pytest.mark.parametrize("threads", [1, 3])
def test_decoding_ahead_in_threads_keeps_order_errors_and_bugs(
    trained: Path, slice_pngs: Path, synthetic_store: Path, tmp_path: Path, threads: int
) -> None:
    """Files decode in threads ahead of the model: the same answers in the same order, a
    broken file in its own row, and a decoder bug still raised (not turned into a row)."""
    predictor = open_predictor(trained, settings=_settings(synthetic_store, tmp_path))
    predictor.decode_threads, predictor.batch_size = threads, 3
    files = collect_inputs([slice_pngs])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    mixed = [*files[:7], broken, *files[7:]] * 3  # 51 files: several windows ahead
    # The same batches (batch_size 3) on both sides: the convolution kernels a CPU picks differ
    # with the batch size (AVX-512 vs AVX2), and so do the last bits of the answers; decoding in
    # threads must change neither the batches nor the answers, so these compare exactly.
    serial = open_predictor(trained, settings=_settings(synthetic_store, tmp_path))
    serial.decode_threads, serial.batch_size = 1, 3
    expected = serial.predict_files(mixed)
    got = predictor.predict_files(mixed)
    assert [p.path for p in got] == [str(f) for f in mixed]
    assert [(p.label, p.error is None) for p in got] == [
        (p.label, p.error is None) for p in expected
    ]
    assert sum(p.error is not None for p in got) == 3 and "broken.png" in got[7].error
    for a, b in zip(got, expected, strict=True):
        assert a.probabilities == b.probabilities

    def buggy(path: Path) -> object:
        raise ZeroDivisionError("a bug in a decoder")

    predictor.read = buggy  # type: ignore[method-assign]
    with pytest.raises(ZeroDivisionError):
        predictor.predict_files(mixed)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    env["COLUMNS"] = "400"  # rich's table width: long temporary paths are not folded
    return subprocess.run(
        [sys.executable, "-m", "ctscan", *args], capture_output=True, text=True, env=env
    )


def _sets(store: Path, tmp_path: Path) -> list[str]:
    out = []
    for item in engine_overrides(store, tmp_path / "runs"):
        out += ["--set", item]
    return out


def test_cli_json_csv_and_a_broken_file(
    trained: Path, slice_pngs: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = sorted(slice_pngs.rglob("*.png"))[:3]
    csv_path = tmp_path / "out" / "predictions.csv"
    proc = _cli(
        "predict",
        *map(str, good),
        str(broken),
        str(tmp_path / "missing.png"),
        "--model",
        str(trained),
        "--json",
        "--csv",
        str(csv_path),
        "--backend",
        "torch",  # the cached ONNX export (the default) is tested in test_export.py
        *_sets(synthetic_store, tmp_path),
    )
    assert proc.returncode == 3, proc.stderr  # some files failed: non-zero, the rest answered
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["path"] for r in rows] == [
        *map(str, good),
        str(broken),
        str(tmp_path / "missing.png"),
    ]
    for row in rows[:3]:
        assert row["label"] in row["probabilities"]
        assert abs(sum(row["probabilities"].values()) - 1) < 1e-5
        assert row["model"]["name"] == "cnn_gap" and row["model"]["backend"] == "torch"
    assert "error" in rows[3] and "broken.png" in rows[3]["error"]
    assert "does not exist" in rows[4]["error"] or "cannot read" in rows[4]["error"]
    assert "Traceback" not in proc.stderr
    with csv_path.open() as fh:
        table = list(csv.DictReader(fh))
    assert [t["label"] for t in table[:3]] == [r["label"] for r in rows[:3]]
    assert table[3]["error"] and not table[3]["label"]


def test_cli_table_for_a_folder(
    trained: Path, slice_pngs: Path, synthetic_store: Path, tmp_path
) -> None:
    proc = _cli(
        "predict",
        str(slice_pngs),
        "--model",
        str(trained),
        "--backend",
        "torch",
        *_sets(synthetic_store, tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert "cnn_gap" in proc.stdout and proc.stdout.count(".png") == 16


def test_bad_models_and_inputs_are_one_line_errors(
    trained: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    settings = _settings(synthetic_store, tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        open_predictor(tmp_path / "none.pt", settings=settings)
    with pytest.raises(CtscanError, match="runs on torch, not onnx"):
        open_predictor(trained, settings=settings, backend="onnx")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_predictor(tmp_path / "none.onnx", settings=settings)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not an onnx model")
    pytest.importorskip("onnxruntime")
    with pytest.raises(CheckpointError, match="not a readable ONNX model"):
        open_predictor(garbage, settings=settings)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image or DICOM files"):
        collect_inputs([tmp_path / "empty"])
    predictor = open_predictor(trained, settings=settings)
    with pytest.raises(DataError, match="expected uint8 images"):
        predictor.logits(np.zeros((1, 1, 8, 8), dtype=np.float32))
    proc = _cli("predict", str(tmp_path), "--model", str(tmp_path / "none.pt"))
    assert proc.returncode == 4 and "Traceback" not in proc.stderr


def test_explain_writes_one_overlay_per_predicted_file(
    trained: Path, slice_pngs: Path, synthetic_store: Path, tmp_path: Path
) -> None:
    files = sorted(slice_pngs.rglob("*.png"))[:3]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"junk")
    out = tmp_path / "cams"
    proc = _cli(
        "predict",
        *map(str, files),
        str(broken),
        "--model",
        str(trained),
        "--json",
        "--explain",
        str(out),
        *_sets(synthetic_store, tmp_path),
    )
    assert proc.returncode == 3, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    written = sorted(out.glob("*.png"))
    assert len(written) == 3  # none for the broken file
    for row in rows[:3]:
        overlay = Path(row["explanation"])
        assert overlay in written
        with Image.open(overlay) as img:
            assert img.format == "PNG" and min(img.size) >= 256
    assert "explanation" not in rows[3]

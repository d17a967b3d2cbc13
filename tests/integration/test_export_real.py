"""`ctscan export` on the real images: ONNX and int8 against the checkpoint on 259 test slices."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ctscan.data.store import load_store
from ctscan.inference import open_predictor
from ctscan.ops import export
from ctscan.ops.export import read_onnx_metadata, run_export
from ctscan.settings import Settings, load_settings
from tests.unit.conftest_real import real_training_overrides

pytestmark = [pytest.mark.integration, pytest.mark.slow]
pytest.importorskip("onnxscript")
pytest.importorskip("onnxruntime")


def _settings(store: Path, runs: Path) -> Settings:
    return load_settings([], real_training_overrides(store, runs))


def test_onnx_and_int8_against_the_checkpoint(
    real_checkpoint_64: Path, real_store_64: Path, tmp_path: Path
) -> None:
    """cnn_gap trained 3 epochs on the real data at 64 px (conftest_real.py), exported."""
    checkpoint, store = real_checkpoint_64, real_store_64
    settings = _settings(store, tmp_path / "runs")
    out = tmp_path / "deploy" / "model.onnx"
    result = run_export(settings, checkpoint, fmt="onnx", int8=True, out=out)
    assert result.n_test == 259
    images = load_store(store).split("test").images.numpy()  # (259, 1, 64, 64) uint8
    labels = load_store(store).split("test").labels.numpy()

    eager = open_predictor(checkpoint, settings=settings, backend="torch")
    onnx_model = open_predictor(out, settings=settings)
    reference = eager.probabilities(images)
    got = onnx_model.probabilities(images)
    assert np.abs(got - reference).max() <= 1e-4
    assert (got.argmax(1) == reference.argmax(1)).all()
    assert (
        onnx_model.info.format == "onnx"
        and read_onnx_metadata(out)["preprocess"]["image_size"] == 64
    )

    rows = {row.format: row for row in result.parity}
    assert rows["onnx"].max_abs_diff <= export.FP32_TOLERANCE and rows["onnx"].agreement == 1.0
    int8_path = out.with_name("model.int8.onnx")
    row = rows["onnx-int8"]
    eager_acc = float((reference.argmax(1) == labels).mean())
    assert rows["eager"].accuracy == pytest.approx(eager_acc)
    by_rule = row.agreement >= export.INT8_MIN_AGREEMENT and (
        eager_acc - row.accuracy <= export.INT8_MAX_ACCURACY_DROP + 1e-9
    )
    assert row.accepted == by_rule == int8_path.is_file()
    assert (result.error is None) == by_rule
    if by_rule:  # the kept file answers as the parity row says
        int8_logits = open_predictor(int8_path, settings=settings).logits(images)
        assert float((int8_logits.argmax(1) == labels).mean()) == pytest.approx(row.accuracy)
    diff = float(np.abs(got - reference).max())
    print(
        f"\nreal test split: eager accuracy {eager_acc:.4f}; onnx max |dp| {diff:.2e}; int8 "
        f"agreement {row.agreement:.4f}, accuracy {row.accuracy:.4f}, accepted {row.accepted}"
    )

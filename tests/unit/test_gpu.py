"""CUDA paths of the loop (bf16 + compile, fp16 + GradScaler); skipped cleanly without a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ctscan.engine.checkpoint import read_checkpoint
from ctscan.engine.train import run_training
from tests.unit.conftest_store import engine_settings

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize(("precision", "compile_"), [("bf16", "on"), ("fp16", "off")])
def test_cuda_training_learns(
    synthetic_store: Path, tmp_path: Path, precision: str, compile_: str
) -> None:
    settings = engine_settings(
        synthetic_store,
        tmp_path / "runs",
        **{
            "train.device": '"cuda"',
            "train.precision": f'"{precision}"',
            "train.compile": f'"{compile_}"',
            "train.epochs": 6,
        },
    )
    result = run_training(settings, out_dir=tmp_path / "run")
    assert result is not None
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert result.history[-1]["train_accuracy"] >= 0.9
    last = read_checkpoint(tmp_path / "run" / "last.pt")
    assert last.training is not None
    for weights in (last.model_state, last.training["model_state"]):
        assert not any(k.startswith(("_orig_mod.", "module.")) for k in weights)
        assert all(t.device.type == "cpu" for t in weights.values())
    scaler = last.training["scaler"]
    if precision == "fp16":  # a live GradScaler: its loss scale and growth tracker are saved
        assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    else:  # bf16 needs no loss scaling: the scaler is disabled and saves nothing
        assert scaler == {}

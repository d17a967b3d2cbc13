"""CUDA paths of the loop (bf16 + compile, fp16 + GradScaler); skipped cleanly without a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ctscan.engine.checkpoint import load_checkpoint
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
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model_state"])
    assert all(t.device.type == "cpu" for t in state["model_state"].values())
    assert state["scaler"] is not None

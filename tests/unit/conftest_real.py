"""Pytest fixtures: the real data preprocessed at 64 px and a model trained on it, made once per
test run and shared by the xdist workers (a plugin module; `real_raw_dir` is in tests/conftest.py).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from ctscan.files import folder_lock
from ctscan.settings import load_settings
from tests.serve_helpers import toml_str


def built_once(
    tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], None]
) -> Path:
    """The folder `name` that `build(folder)` writes once per test run: the xdist workers of a
    run share it (the first builds it under a lock, the others wait for it); tests only read it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder, done = root / name, root / f"{name}.done"
    with folder_lock(root, what="shared test folder", wait=1800, name=f"{name}.lock"):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed half-way
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def real_store_64(real_raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real data preprocessed at 64 px with the official split (on_leak=keep)."""
    from ctscan.data.preprocess import run_preprocess

    def build(out: Path) -> None:
        overrides = [f"paths.raw_dir={toml_str(real_raw_dir)}", "data.image_size=64"]
        settings = load_settings([], [*overrides, f"paths.processed_dir={toml_str(out)}"])
        assert run_preprocess(settings).store_dir == out

    return built_once(tmp_path_factory, "real-store-64", build)


def real_training_overrides(store: Path, runs: Path) -> list[str]:
    """cnn_gap for 3 epochs on `store` (the real data at 64 px) on the CPU, without tracking."""
    return [
        f"paths.processed_dir={toml_str(store)}",
        f"paths.runs_dir={toml_str(runs)}",
        "data.image_size=64",
        'model.name="cnn_gap"',
        "model.pretrained=false",
        'train.device="cpu"',
        "train.epochs=3",
        "train.batch_size=64",
        "train.evaluate_test=false",
        "train.quiet=true",
        "train.threads=1",  # two pytest workers share the cores (tests/conftest.py)
        "tracking.enabled=false",
    ]


@pytest.fixture(scope="session")
def real_checkpoint_64(real_store_64: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of cnn_gap trained 3 epochs on `real_store_64` (`real_training_overrides`)."""
    from ctscan.engine.train import run_training

    def build(folder: Path) -> None:
        settings = load_settings([], real_training_overrides(real_store_64, folder / "runs"))
        run_training(settings, out_dir=folder / "run")

    return built_once(tmp_path_factory, "real-run-64", build) / "run" / "best.pt"

"""Pytest fixtures: small synthetic processed stores for engine tests (a plugin module)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ctscan import CLASS_NAMES
from ctscan.data.reference import build_reference
from ctscan.data.store import Split, write_store
from ctscan.data.transforms import PreprocessSpec
from ctscan.settings import DataSettings, Settings, load_settings
from tests.processes import stopping_at


def make_split(n_per_class: int, size: int, seed: int, split: str) -> Split:
    """Class k: a bright square in quadrant k over noise; learnable in a few steps."""
    rng = np.random.default_rng(seed)
    images, labels, paths, hashes = [], [], [], []
    half = size // 2
    for label in range(len(CLASS_NAMES)):
        for i in range(n_per_class):
            img = rng.integers(0, 60, (size, size), dtype=np.uint8)
            r, c = divmod(label, 2)
            jitter = rng.integers(0, max(1, half // 4), 2)
            top, left = r * half + jitter[0], c * half + jitter[1]
            img[top : top + half // 2, left : left + half // 2] = 220
            images.append(img[None])
            labels.append(label)
            paths.append(f"{split}/{CLASS_NAMES[label]}/{i}.png")
            hashes.append(f"{split}-{label}-{i}")
    return Split(
        images=np.stack(images).astype(np.uint8)
        if images
        else np.zeros((0, 1, size, size), np.uint8),
        labels=np.array(labels, dtype=np.int64),
        paths=paths,
        hashes=hashes,
    )


def write_synthetic_store(
    out_dir: Path,
    *,
    size: int = 32,
    train: int = 16,
    valid: int = 4,
    test: int = 4,
    reference: bool = False,
) -> Path:
    """A processed store with separable synthetic classes (and one planted test leak).

    `reference`: with the drift reference preprocess writes (reference.json).
    """
    splits = {
        "train": make_split(train, size, 0, "train"),
        "valid": make_split(valid, size, 1, "valid"),
        "test": make_split(test, size, 2, "test"),
    }
    if test:
        splits["test"].hashes[0] = splits["train"].hashes[0]  # a leaked test image
    data = DataSettings(image_size=size).model_dump()
    spec = PreprocessSpec(
        image_size=size,
        resize="pad",
        mean=float(splits["train"].images.mean() / 255),
        std=float(splits["train"].images.std() / 255),
        class_names=CLASS_NAMES,
    )
    return write_store(
        out_dir,
        splits,
        spec=spec,
        data_settings=data,
        raw_dir=None,
        raw_fingerprint="synthetic",
        on_leak=data["on_leak"],
        reference=build_reference(splits["train"].images) if reference else None,
    )


def engine_overrides(store: Path, runs: Path, size: int = 32, **extra: object) -> list[str]:
    """`--set` overrides for a fast CPU run on a synthetic store."""
    base = {
        "paths.processed_dir": f'"{store}"',
        "paths.runs_dir": f'"{runs}"',
        "data.image_size": size,
        "model.name": '"cnn_gap"',
        "model.pretrained": "false",
        "train.device": '"cpu"',
        "train.batch_size": 16,
        "train.epochs": 3,
        "train.lr": 0.003,
        "train.warmup_epochs": 0,
        "train.ema": "false",
        "train.quiet": "true",
        "train.threads": 1,
        "tracking.enabled": "false",
        # Flips would move the quadrant that defines the class: augmentation off unless asked.
        "augment.enabled": "false",
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def engine_settings(store: Path, runs: Path, size: int = 32, **extra: object) -> Settings:
    return load_settings([], engine_overrides(store, runs, size, **extra))


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic store shared by the session (read-only for tests)."""
    return write_synthetic_store(tmp_path_factory.mktemp("store") / "processed")


@pytest.fixture(scope="session")
def trained(synthetic_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best.pt of a 3-epoch cnn_gap run on the synthetic store (shared: read-only)."""
    from ctscan.engine.train import run_training

    out = tmp_path_factory.mktemp("trained") / "run"
    settings = engine_settings(
        synthetic_store, out.parent / "runs", **{"train.epochs": 3, "train.evaluate_test": "false"}
    )
    run_training(settings, out_dir=out)
    return out / "best.pt"


@pytest.fixture
def ctrl_c_in_validation(monkeypatch: pytest.MonkeyPatch) -> Callable[[int | None], None]:
    """`ctrl_c_in_validation(n)`: the n-th validation from now on (an epoch's end, counted across
    folds and trials) raises KeyboardInterrupt, as a Ctrl-C landing there does; `(None)`:
    validation as it was."""
    import ctscan.engine.train as train

    validate = train.validate

    def ctrl_c() -> None:
        raise KeyboardInterrupt

    def arm(n: int | None) -> None:
        monkeypatch.setattr(
            train, "validate", validate if n is None else stopping_at(validate, n, ctrl_c)
        )

    return arm

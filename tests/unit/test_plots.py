"""Tests for ctscan.engine.plots: each plot writes a readable PNG of a sensible shape."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctscan.engine.metrics import classification_report
from ctscan.engine.plots import (
    plot_confusion_matrix,
    plot_curves,
    plot_error_grid,
    plot_reliability,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
NAMES = ["adenocarcinoma", "large_cell_carcinoma", "squamous_cell_carcinoma", "normal"]


def _png_size(path: Path) -> tuple[int, int]:
    """Assert `path` is a valid PNG and return its (width, height)."""
    assert path.is_file()
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 0 and height > 0
    return width, height


def _report() -> dict:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 40)
    logits = rng.normal(size=(40, 4)) + 2.0 * np.eye(4)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return classification_report(y, probs, NAMES, n_bins=10)


def test_confusion_matrix_png(tmp_path: Path) -> None:
    cm = np.array(_report()["confusion_matrix"])
    cm[3] = 0  # a class without samples
    out = plot_confusion_matrix(cm, NAMES, tmp_path / "sub" / "cm.png")
    assert out == tmp_path / "sub" / "cm.png"
    width, height = _png_size(out)
    assert width > height  # the colour bar sits to the right of a square matrix


def test_confusion_matrix_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="square"):
        plot_confusion_matrix(np.zeros((3, 3)), NAMES, tmp_path / "cm.png")
    assert not (tmp_path / "cm.png").exists()


def test_reliability_png(tmp_path: Path) -> None:
    report = _report()
    assert any(b["count"] == 0 for b in report["reliability"])  # empty bins are drawn as gaps
    out = plot_reliability(report["reliability"], report["ece"], tmp_path / "rel.png")
    _png_size(out)


def test_curves_png_tolerates_missing_keys(tmp_path: Path) -> None:
    history = [
        {"epoch": 1, "train_loss": 1.2, "val_loss": 1.1, "lr": 1e-3, "val_macro_f1": 0.4},
        {"epoch": 2, "train_loss": 0.9, "val_loss": None, "lr": 5e-4, "val_accuracy": 0.6},
        {"epoch": 3, "train_loss": float("nan"), "train_accuracy": 0.7},
    ]
    assert min(_png_size(plot_curves(history, tmp_path / "curves.png"))) > 0
    assert min(_png_size(plot_curves([], tmp_path / "empty.png"))) > 0


def test_error_grid_layout(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32), dtype=np.uint8)
    captions = (NAMES[:1] * 16, NAMES[1:2] * 16, np.linspace(0.9, 0.5, 16).tolist())
    wide = _png_size(plot_error_grid(images[:4], *(c[:4] for c in captions), tmp_path / "w.png"))
    tall = _png_size(plot_error_grid(images, *captions, tmp_path / "tall.png"))
    assert wide[0] > wide[1]  # one row of four
    assert tall[1] > tall[0]  # four rows of four


def test_error_grid_without_errors(tmp_path: Path) -> None:
    out = plot_error_grid(np.zeros((0, 32, 32), np.uint8), [], [], [], tmp_path / "none.png")
    assert min(_png_size(out)) > 0  # a valid, non-empty picture even with nothing to show


def test_error_grid_rejects_caption_mismatch(tmp_path: Path) -> None:
    images = np.zeros((2, 8, 8), np.uint8)
    with pytest.raises(ValueError, match="one caption per image"):
        plot_error_grid(images, ["a"], ["b", "c"], [0.5, 0.6], tmp_path / "bad.png")


def test_import_is_light_and_leaves_no_pyplot_figures(tmp_path: Path) -> None:
    code = (
        "import sys, numpy as np, ctscan.engine.plots as p; "
        "assert 'matplotlib' not in sys.modules, 'imported at module load'; "
        f"p.plot_curves([{{'epoch': 1, 'train_loss': 1.0}}], {str(tmp_path / 'c.png')!r}); "
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot used'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    _png_size(tmp_path / "c.png")

"""PNG plots of evaluation results: confusion matrix, reliability diagram, curves, worst errors.

matplotlib is imported inside each function (so importing ctscan stays fast) and used through
`matplotlib.figure.Figure` with the Agg renderer, never through pyplot: no global backend switch,
no GUI, no figure left open, safe to call from any thread.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DPI = 110


def _figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    """A figure; `layout=None` where the panels' margins are fixed, set by the caller (matplotlib's
    constrained layout draws the figure twice: half of a small training's plotting time)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout=layout)


def _save(figure: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=DPI)
    figure.clear()
    return out


def plot_confusion_matrix(cm: Any, class_names: Sequence[str], path: str | Path) -> Path:
    """Draw a confusion matrix (rows true, columns predicted) with the count in every cell."""
    counts = np.asarray(cm).astype(np.int64)
    names = [str(name) for name in class_names]
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(names):
        raise ValueError(
            f"cm must be square (C, C) with C = len(class_names) = {len(names)}, "
            f"got shape {counts.shape}."
        )
    size, top = len(names), max(int(counts.max(initial=0)), 1)
    side = 2.2 + 1.1 * size
    figure = _figure(side + 1.2, side)
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues", vmin=0, vmax=top)
    figure.colorbar(image, ax=axes, shrink=0.8, label="count")
    for i in range(size):
        for j in range(size):
            color = "white" if counts[i, j] > 0.5 * top else "black"
            axes.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=9, color=color)
    axes.set_xticks(range(size), labels=names, rotation=35, ha="right", fontsize=8)
    axes.set_yticks(range(size), labels=names, fontsize=8)
    axes.set(xlabel="predicted", ylabel="true", title="Confusion matrix")
    return _save(figure, path)


def plot_reliability(
    reliability_bins: Sequence[Mapping[str, Any]], ece: float, path: str | Path
) -> Path:
    """Draw accuracy against confidence per bin (`classification_report`'s `reliability`)."""
    figure = _figure(5.5, 5.0)
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="gray", label="perfect calibration")
    for row in reliability_bins:
        count = int(row.get("count", 0) or 0)
        accuracy = row.get("accuracy")
        if not count or accuracy is None:
            continue
        lower, upper = float(row["lower"]), float(row["upper"])
        bar = {"align": "edge", "color": "tab:blue", "edgecolor": "black", "alpha": 0.75}
        axes.bar(lower, accuracy, width=upper - lower, **bar)
        if (confidence := row.get("mean_confidence")) is not None:
            axes.plot(confidence, accuracy, marker="o", color="tab:red", markersize=3)
        axes.text((lower + upper) / 2, accuracy + 0.01, str(count), ha="center", fontsize=7)
    # ylim 1.08: room for the counts above bars of accuracy 1
    axes.set(xlim=(0, 1), ylim=(0, 1.08), yticks=np.linspace(0, 1, 6))
    axes.set(xlabel="confidence (top-label probability)", ylabel="accuracy")
    axes.set_title(f"Reliability diagram (ECE = {float(ece):.3f})")
    axes.legend(loc="upper left", fontsize=8, title="bar label: samples in bin", title_fontsize=7)
    return _save(figure, path)


_CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("train_loss", "val_loss")),
    ("accuracy", ("train_accuracy", "val_accuracy")),
    ("macro F1", ("train_macro_f1", "val_macro_f1")),
    ("learning rate", ("lr",)),
)


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """Return the (epochs, values) of `key` over the rows that have a finite number for it."""
    points = [
        (float(row.get("epoch", index + 1)), float(value))
        for index, row in enumerate(history)
        if isinstance(value := row.get(key), int | float | np.number) and math.isfinite(value)
    ]
    return [e for e, _ in points], [v for _, v in points]


def plot_curves(history: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Draw per-epoch loss, accuracy, macro F1 (train and val) and learning rate in four panels;
    missing, None and non-finite values are skipped."""
    figure = _figure(10.0, 7.0, layout=None)
    margins = {"left": 0.07, "right": 0.98, "bottom": 0.07, "top": 0.95}
    grid = figure.subplots(2, 2, gridspec_kw=margins | {"wspace": 0.2, "hspace": 0.3})
    for axes, (label, keys) in zip(grid.flat, _CURVE_PANELS, strict=True):
        series = {key: _series(history, key) for key in keys}
        for key, (epochs, values) in series.items():
            if values:
                axes.plot(epochs, values, marker="o", markersize=3, label=key)
        if any(values for _, values in series.values()):
            axes.legend(fontsize=8)
            axes.grid(alpha=0.3)
        else:
            axes.text(0.5, 0.5, "no data", ha="center", va="center", transform=axes.transAxes)
        if label == "learning rate":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        axes.set(title=label, xlabel="epoch")
    return _save(figure, path)


def plot_error_grid(
    images: Any,
    true_names: Sequence[str],
    pred_names: Sequence[str],
    confidences: Sequence[float],
    path: str | Path,
) -> Path:
    """Draw misclassified images (K, H, W) uint8 gray, 4 a row, captioned "true -> pred
    (p=0.93)"; none says so."""
    pictures = np.asarray(images)
    count = len(pictures)
    if count and pictures.ndim != 3:
        raise ValueError(f"images must be (K, H, W), got shape {pictures.shape}.")
    if not len(true_names) == len(pred_names) == len(confidences) == count:
        raise ValueError(
            f"need one caption per image: {count} images, {len(true_names)} true names, "
            f"{len(pred_names)} predicted names, {len(confidences)} confidences."
        )
    ncols = min(4, count) or 1  # none: one empty panel that says so
    nrows = math.ceil(count / ncols) or 1
    height = 2.9 * nrows + 0.4
    figure = _figure(2.6 * ncols, height, layout=None)
    margins = {"left": 0.02, "right": 0.98, "bottom": 0.02, "top": 1 - 0.8 / height}
    panels = figure.subplots(nrows, ncols, squeeze=False, gridspec_kw=margins | {"hspace": 0.3})
    for index, axes in enumerate(panels.reshape(-1)):
        axes.set_axis_off()
        if index < count:
            axes.imshow(pictures[index], cmap="gray", vmin=0, vmax=255)
            caption = f"{true_names[index]} -> {pred_names[index]} (p={confidences[index]:.2f})"
            axes.set_title(textwrap.fill(caption, width=30), fontsize=7)
        elif not count:
            axes.text(0.5, 0.5, "no errors", ha="center", va="center", fontsize=14)
    figure.suptitle("Most confident errors")
    return _save(figure, path)

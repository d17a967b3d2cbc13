"""Evaluate a checkpoint on a split of the processed store: metrics, plots, the leak-free subset.

The probabilities scored are the ones every consumer shows, softmax(logits / T); `calibration`
in the result gives the split's ECE and log-loss before (T = 1) and after.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctscan.data.store import Split, Store, open_model_store
from ctscan.data.transforms import model_input
from ctscan.engine.checkpoint import Checkpoint, load_model, read_checkpoint
from ctscan.engine.metrics import SUMMARY, classification_report, probabilities, worst_errors
from ctscan.engine.plots import plot_confusion_matrix, plot_error_grid, plot_reliability
from ctscan.engine.runtime import Runtime, resolve_runtime
from ctscan.engine.temperature import FIT_SPLIT, apply_temperature
from ctscan.engine.tracking import open_tracker
from ctscan.errors import CtscanError, DataError
from ctscan.files import atomic_write, ensure_dir
from ctscan.settings import Settings

SPLITS = ("train", "valid", "test")
WORST_ERRORS = 16


def leak_free_mask(store: Store, split: str) -> np.ndarray:
    """True for images of `split` with no exact duplicate (same pixels) in an earlier split."""
    others = {"test": ("train", "valid"), "valid": ("train",), "train": ()}[split]
    seen = {h for other in others for h in store.split(other).hashes}
    return np.array([h not in seen for h in store.split(split).hashes], dtype=bool)


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: torch.Tensor,
    *,
    mean: float,
    std: float,
    channels: int,
    rt: Runtime,
    batch_size: int = 128,
) -> torch.Tensor:
    """Logits (N, C) as float32 for uint8 images (N, 1, S, S) on the runtime's device."""
    was_training = model.training
    model.eval()
    outs = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size].to(rt.device, non_blocking=True)
        x = model_input(
            chunk, mean=mean, std=std, channels=channels, channels_last=rt.channels_last
        )
        with rt.autocast():
            outs.append(model(x).float())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def raw_logits(checkpoint: Checkpoint, images: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """The checkpoint's logits before its temperature on uint8 images (N, 1, S, S), on rt."""
    loaded = load_model(checkpoint, device=rt.device, channels_last=rt.channels_last)
    spec = loaded.spec
    return predict(
        loaded.model, images, mean=spec.mean, std=spec.std, channels=loaded.channels, rt=rt
    )


def require_same_spec(checkpoint: Checkpoint, store: Store) -> None:
    """The store holds images preprocessed as the checkpoint expects, else a DataError."""
    if checkpoint.spec != store.spec:
        raise DataError(
            f"checkpoint '{checkpoint.source}' expects images preprocessed as "
            f"{checkpoint.spec.to_dict()}, but the store at {store.path} holds "
            f"{store.spec.to_dict()}.",
            "run `ctscan preprocess` with the checkpoint's data settings "
            "(see settings.toml in its run folder) and evaluate again.",
        )


def calibration_summary(
    checkpoint: Checkpoint,
    y_true: np.ndarray,
    logits: torch.Tensor,
    names: list[str],
    split: str,
    after: dict[str, Any],
) -> dict[str, Any]:
    """ECE and log-loss of `split` before (T = 1) and after (`after`: the calibrated report)."""
    before = classification_report(y_true, probabilities(logits), names)
    fitted_on = (checkpoint.calibration or {}).get("split", FIT_SPLIT)
    return {
        "temperature": checkpoint.temperature,
        "text": checkpoint.calibration_text,
        "calibrated": checkpoint.temperature != 1.0,
        "fit_attempted": checkpoint.calibration is not None,  # (T may have stayed 1)
        "ensemble": checkpoint.is_ensemble,
        "fitted_on_this_split": checkpoint.calibration is not None and fitted_on == split,
        "before": {k: before[k] for k in ("ece", "ece_debiased", "log_loss")},
        "after": {k: after[k] for k in ("ece", "ece_debiased", "log_loss")},
    }


def evaluate_checkpoint(
    checkpoint: Checkpoint | Path, *, store: Store, split: str, rt: Runtime, out_dir: Path | None
) -> dict[str, Any]:
    """Metrics of the checkpoint's model on `split`; writes JSON and PNGs to `out_dir` if given."""
    if split not in SPLITS:
        raise CtscanError(
            f"split '{split}' is not one of {', '.join(SPLITS)}.", "use --split test."
        )
    if not isinstance(checkpoint, Checkpoint):
        checkpoint = read_checkpoint(checkpoint)
    require_same_spec(checkpoint, store)
    data = store.split(split)
    if len(data.labels) == 0:
        raise DataError(
            f"the {split} split of the store '{store.path}' holds no images.",
            "evaluate another split (--split valid), or preprocess a raw folder that has "
            f"images in {split}/.",
        )
    logits = raw_logits(checkpoint, data.images, rt)
    probs = probabilities(apply_temperature(logits, checkpoint.temperature))  # what users see
    y_true = data.labels.cpu().numpy()
    names = list(store.spec.class_names)
    report = classification_report(y_true, probs, names)
    mask = leak_free_mask(store, split)
    leak_free = classification_report(y_true[mask], probs[mask], names) if mask.any() else None
    result: dict[str, Any] = {
        **report,
        "split": split,
        "checkpoint": str(checkpoint.source),
        "checkpoint_kind": checkpoint.kind,
        "model_name": checkpoint.model_name,
        "epoch": checkpoint.epoch,
        "data_hash": checkpoint.data_hash,
        "git_commit": checkpoint.git_commit,
        "temperature": checkpoint.temperature,
        "calibration": calibration_summary(checkpoint, y_true, logits, names, split, report),
        "leak_free": leak_free,
        "leak_free_excluded": int((~mask).sum()),
        "predictions": [
            {
                "path": path,
                "true": names[int(y)],
                "label": names[int(row.argmax())],
                "probabilities": {n: float(v) for n, v in zip(names, row, strict=True)},
            }
            for path, y, row in zip(data.paths, y_true, probs, strict=True)
        ],
    }
    if out_dir is not None:
        _write_outputs(result, probs, data, out_dir)
    return result


def _write_outputs(result: dict[str, Any], probs: np.ndarray, data: Split, out_dir: Path) -> None:
    """The report files: evaluation.json and the confusion, reliability and worst-error PNGs."""
    y_true, names = data.labels.cpu().numpy(), result["class_names"]
    ensure_dir(out_dir, what="report folder")
    plot_confusion_matrix(
        np.array(result["confusion_matrix"]), names, out_dir / "confusion_matrix.png"
    )
    plot_reliability(result["reliability"], result["ece"], out_dir / "reliability.png")
    preds, worst = probs.argmax(1), worst_errors(y_true, probs, WORST_ERRORS)
    rows = [
        {
            "path": data.paths[i],
            "true": names[y_true[i]],
            "predicted": names[preds[i]],
            "confidence": float(probs[i, preds[i]]),
        }
        for i in worst
    ]
    plot_error_grid(
        data.images[worst, 0].cpu().numpy(),  # (K, S, S) uint8
        *([row[k] for row in rows] for k in ("true", "predicted", "confidence")),
        out_dir / "worst_errors.png",
    )
    result["worst_errors"] = rows
    result["outputs"] = str(out_dir)
    atomic_write(out_dir / "evaluation.json", json.dumps(result, indent=2).encode())


def log_evaluation(tracker: Any, result: dict[str, Any], *, step: int) -> None:
    """An evaluation's figures (`<split>_accuracy`, ...) and report files in the run record."""
    split = result["split"]
    figures = (*SUMMARY, "ece", "log_loss")
    metrics = {f"{split}_{k}": float(result[k]) for k in figures if result.get(k) is not None}
    if result["ece_debiased"]:  # with the 95 % interval's upper end: what the target judges
        metrics[f"{split}_ece_debiased"] = result["ece_debiased"]["estimate"]
        metrics[f"{split}_ece_debiased_ci95_high"] = result["ece_debiased"]["ci95"][1]
    before = result["calibration"]["before"]
    metrics[f"{split}_ece_uncalibrated"] = before["ece"]
    metrics[f"{split}_ece_floor_p95"] = result["ece_floor"]["p95"]
    metrics[f"{split}_log_loss_uncalibrated"] = before["log_loss"]
    tracker.log_metrics(metrics, step=step)
    for path in sorted(Path(result["outputs"]).iterdir()):
        tracker.log_artifact(path, artifact_path=f"eval-{split}")


def run_evaluation(
    settings: Settings, checkpoint: Path, *, split: str = "test", out_dir: Path | None = None
) -> dict[str, Any]:
    """The `ctscan evaluate` command: load, evaluate, write report files, log to MLflow if on."""
    rt = resolve_runtime(settings.train)
    if rt.distributed:
        raise CtscanError("evaluate runs in one process.", "run it without torchrun.")
    ckpt = read_checkpoint(checkpoint)
    store = open_model_store(settings, ckpt)
    out = ensure_dir(out_dir or Path(checkpoint).parent / f"eval-{split}", what="report folder")
    result = evaluate_checkpoint(ckpt, store=store, split=split, rt=rt, out_dir=out)
    result["warnings"] = [store.raw_warning] if store.raw_warning else []
    if settings.tracking.enabled:
        with open_tracker(
            settings.tracking,
            runs_dir=settings.paths.runs_dir,
            run_name=f"evaluate-{Path(checkpoint).parent.name}-{split}",
        ) as tracker:
            tracker.set_tags({"kind": "evaluate", "checkpoint": str(checkpoint), "split": split})
            log_evaluation(tracker, result, step=0)
            tracker.log_metrics({"temperature": result["temperature"]}, step=0)
    return result

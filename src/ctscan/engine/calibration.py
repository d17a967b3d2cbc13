"""Calibrating a checkpoint: fit T on its validation logits, write it back (`ctscan calibrate`).

The math (the fit, applying T, describing it) is in temperature.py, which imports nothing of the
engine, so checkpoint.py and evaluate.py read T without importing this module.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from ctscan.data.reference import CONFIDENCE_FILE, confidence_reference
from ctscan.data.store import Store, open_model_store
from ctscan.engine.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from ctscan.engine.evaluate import raw_logits, require_same_spec
from ctscan.engine.metrics import classification_report, probabilities
from ctscan.engine.runtime import Runtime, resolve_runtime
from ctscan.engine.temperature import FIT_SPLIT, T_MAX, T_MIN, apply_temperature, fit_temperature
from ctscan.errors import CtscanError
from ctscan.files import atomic_write, checkpoint_file_problem, ensure_dir, folder_lock
from ctscan.settings import Settings


def validation_logits(checkpoint: Checkpoint, store: Store, rt: Runtime) -> tuple[Any, np.ndarray]:
    """The checkpoint's raw (uncalibrated) logits on the store's validation split, and labels."""
    require_same_spec(checkpoint, store)
    data = store.split(FIT_SPLIT)  # the one split read: never test
    return raw_logits(checkpoint, data.images, rt).cpu(), data.labels.cpu().numpy()


def calibration_report(
    logits: np.ndarray, labels: np.ndarray, class_names: list[str], split: str
) -> dict[str, Any]:
    """Fit T on held-out `logits` (from `split`): the fit, and ECE / log-loss before and after
    (`Checkpoint.calibration`)."""
    fit = fit_temperature(logits, labels)
    report: dict[str, Any] = {"method": "temperature", "split": split, **fit.to_dict()}
    report["bounds"] = [T_MIN, T_MAX]
    if fit.n:
        for key, temperature in (("before", 1.0), ("after", fit.temperature)):
            probs = probabilities(apply_temperature(logits, temperature))
            metrics = classification_report(labels, probs, list(class_names))
            report[f"ece_{key}"] = metrics["ece"]
            report[f"ece_floor_{key}"] = metrics["ece_floor"]  # a calibrated model's ECE here
            report[f"ece_debiased_{key}"] = metrics["ece_debiased"]  # with its 95 % interval
            report[f"log_loss_{key}"] = metrics["log_loss"]
    return report


def fit_checkpoint(
    checkpoint: Checkpoint, store: Store, rt: Runtime
) -> tuple[Checkpoint, dict[str, Any]]:
    """(`checkpoint` with T fitted on the validation split, the report); from the raw logits,
    whatever T it held."""
    logits, labels = validation_logits(checkpoint, store, rt)
    report = calibration_report(logits, labels, checkpoint.class_names, FIT_SPLIT)
    temperature = report["temperature"]
    return dataclasses.replace(checkpoint, temperature=temperature, calibration=report), report


def train_confidence(checkpoint: Checkpoint, store: Store, rt: Runtime) -> dict[str, Any]:
    """reference_confidence.json: the calibrated max-softmax on every train image and the
    store's feature sample, the drift reference that travels with the model."""
    logits = raw_logits(checkpoint, store.split("train").images, rt)
    probs = probabilities(apply_temperature(logits, checkpoint.temperature))
    confidence, temperature = probs.max(axis=1), checkpoint.temperature
    return confidence_reference(confidence, temperature=temperature, features=store.reference())


# ---- `ctscan calibrate` -------------------------------------------------------------------


def run_calibrate(
    settings: Settings, checkpoint: Path | str, *, out: Path | None = None
) -> dict[str, Any]:
    """The `ctscan calibrate` command: fit T on the store's validation split, write the file
    (in place unless `out`) and the reference_confidence.json beside it; JSON-ready result."""
    rt = resolve_runtime(settings.train)
    if rt.distributed:
        raise CtscanError("calibrate runs in one process.", "run it without torchrun.")
    source = Path(checkpoint)
    ckpt = read_checkpoint(source)
    target = source if out is None else Path(out)
    if (problem := checkpoint_file_problem(target, example=source.name)) is not None:
        raise problem
    target = ensure_dir(target.parent, what="folder of the --out checkpoint") / target.name
    store = open_model_store(settings, ckpt)
    with folder_lock(target.parent, what="checkpoint folder"):
        calibrated, report = fit_checkpoint(ckpt, store, rt)
        save_checkpoint(target, calibrated)
        reference = None
        same_folder = target.parent.resolve() == source.parent.resolve()
        # another file in the source's folder: the reference there belongs to the source
        if target.resolve() == source.resolve() or not same_folder:
            body = json.dumps(train_confidence(calibrated, store, rt)).encode()
            reference = atomic_write(target.parent / CONFIDENCE_FILE, body)
    warnings = [store.raw_warning] if store.raw_warning else []
    if report.get("note"):
        warnings.append(str(report["note"]))
    return {
        "source": str(source),
        "checkpoint": str(target),
        "previous_temperature": ckpt.temperature,
        "temperature": float(report["temperature"]),
        "calibration": report,
        "reference_confidence": str(reference) if reference else None,
        "warnings": warnings,
    }

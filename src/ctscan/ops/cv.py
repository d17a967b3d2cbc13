"""Cross-validated selection: `ctscan train --folds K` (docs/cv.md).

One model per fold (data/folds.py) trains on the other K-1 folds; then the pooled out-of-fold
predictions fit the temperature written into every fold's best.pt, and only then is the test
split read, once. A stop keeps the finished folds: the same command with `--out` continues.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import numpy as np

from ctscan.data.folds import FoldPlan, fold_splits, plan_folds
from ctscan.data.reference import CONFIDENCE_FILE
from ctscan.data.store import open_settings_store
from ctscan.engine.calibration import calibration_report, train_confidence
from ctscan.engine.checkpoint import read_checkpoint, save_checkpoint
from ctscan.engine.evaluate import (
    evaluate_checkpoint,
    leak_free_mask,
    raw_logits,
    require_same_spec,
)
from ctscan.engine.metrics import classification_report, probabilities
from ctscan.engine.run_folder import refuse_reserved_out
from ctscan.engine.runtime import resolve_runtime
from ctscan.engine.temperature import apply_temperature
from ctscan.engine.tracking import open_tracker
from ctscan.engine.train import RunHooks, run_training
from ctscan.errors import CheckpointError, CtscanError, Interrupted, SettingsError, say_line
from ctscan.files import atomic_write, ensure_dir, folder_lock
from ctscan.jobs import check_stop, critical, experiment_fix, refused_changes, stopped
from ctscan.settings import Settings, public_dict, to_toml

FOLDS_FILE = "folds.json"
FOLD_FILE = "fold.json"
OOF_FILE = "oof.json"
CV_FILE = "cv.json"
TAG_CV = "ctscan.cv"
TAG_FOLD = "ctscan.cv_fold"
FOLD_FIX = "use --folds 5 (or leave --folds out to select on the valid split)."


def _write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, json.dumps(data, indent=1).encode())


def _read_json(path: Path, keys: tuple[str, ...], fix: str) -> dict[str, Any]:
    """A JSON object with `keys`, or one clear error naming the file and `fix`."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CtscanError(f"'{path}' cannot be read ({exc}).", fix) from None
    if missing := [k for k in keys if not isinstance(data, dict) or k not in data]:
        raise CtscanError(f"'{path}' is not ctscan's (no {', '.join(missing)}).", fix)
    return data


def _fold_fix(cv_dir: Path, fold: int) -> str:
    return f"delete '{cv_dir / f'fold-{fold}'}' and rerun: that fold trains again."


def _mean_std(values: list[float]) -> dict[str, Any]:
    values = [float(v) for v in values]
    mean = statistics.fmean(values) if values else None
    std = (statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
    return {"mean": mean, "std": std, "values": values}


@dataclass
class _Cv:
    """One cross-validation as it runs: what its steps read."""

    settings: Settings  # as the user gave them (the test, the temperature, the metric)
    store: Any
    plan: FoldPlan
    cv_dir: Path
    say: Callable[[str], None]
    stage: str = "before the first fold"  # where a stop lands, said in its line

    @property
    def fold_settings(self) -> Settings:
        """What every fold trains with: no test, no registry, no valid-split temperature."""
        train = self.settings.train.model_copy(update={"evaluate_test": False, "calibrate": False})
        tracking = self.settings.tracking.model_copy(update={"log_model": False})
        return self.settings.model_copy(update={"train": train, "tracking": tracking})

    @cached_property
    def rt(self) -> Any:
        return resolve_runtime(self.settings.train)


@dataclass
class CvResult:
    """What `ctscan train --folds K` produced."""

    run_dir: Path
    k: int
    select_metric: str
    folds: list[dict[str, Any]]
    selection: dict[str, Any]
    oof: dict[str, Any]
    calibration: dict[str, Any] | None = None
    test: dict[str, Any] | None = None
    run_id: str | None = None
    assignment: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """JSON-ready (cv.json and stdout)."""
        return {
            "run_dir": str(self.run_dir),
            "folds": self.k,
            "select_metric": self.select_metric,
            "assignment": self.assignment,
            "per_fold": self.folds,
            "selection": self.selection,
            "out_of_fold": self.oof,
            "calibration": self.calibration,
            "test": self.test,
            "mlflow_run_id": self.run_id,
        }


def _check_same_cv(cv_dir: Path, plan: FoldPlan, settings: Settings) -> dict[str, Any] | None:
    """folds.json of an earlier (interrupted) run, which must match (None for a new folder);
    a finished one or another's runs are refused (exit 4, as a refused resume)."""
    if (cv_dir / CV_FILE).is_file():
        raise CheckpointError(
            f"'{cv_dir}' holds a finished cross-validation ({CV_FILE}); its test split "
            "has been read.",
            "choose another --out for a new one.",
        )
    if not (cv_dir / FOLDS_FILE).is_file():
        if any(cv_dir.glob("fold-*")) or (cv_dir / "last.pt").exists():
            raise CtscanError(
                f"'{cv_dir}' holds runs but no {FOLDS_FILE}: it is not a cross-validation "
                "folder ctscan can continue.",
                "choose another --out.",
            )
        return None
    recorded = _read_json(
        cv_dir / FOLDS_FILE,
        ("k", "identity", "settings"),
        "start a new cross-validation (another --out); the fold folders can be kept aside.",
    )
    fix = (
        f"rerun with the settings it used (-s {cv_dir / 'settings.toml'}) and --folds "
        f"{recorded.get('k')}, or start a new cross-validation (another --out)."
    )
    if recorded.get("k") != plan.k or recorded.get("identity") != plan.identity:
        raise CheckpointError(
            f"'{cv_dir}' holds another cross-validation ({recorded.get('k')} folds, another "
            "assignment of images to folds).",
            fix,
        )
    if refused := refused_changes(recorded.get("settings") or {}, settings):
        raise CheckpointError(
            f"'{cv_dir}' was trained with other settings: {'; '.join(refused)}.", fix
        )
    return recorded


def _train_fold(cv: _Cv, fold: int, parent: str | None) -> dict[str, Any]:
    """Train fold `fold` (1-based), or resume it from its last.pt; returns its fold.json."""
    fold_dir = cv.cv_dir / f"fold-{fold}"
    train_split, held_out = fold_splits(cv.plan, fold - 1)
    tags = {TAG_CV: cv.cv_dir.name, TAG_FOLD: str(fold)}
    resume = "auto" if (fold_dir / "last.pt").is_file() else None
    result = run_training(
        cv.fold_settings,
        out_dir=fold_dir,
        resume=resume,
        hooks=RunHooks(tags, parent_run_id=parent),
        splits=(train_split, held_out),
    )
    assert result is not None  # one process
    best_row = next(r for r in result.history if r["epoch"] == result.best_epoch)
    record = {
        "fold": fold,
        "train_images": len(train_split),
        "held_out_images": len(held_out),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "best": {k: v for k, v in best_row.items() if k.startswith("val_")},
        "seconds": round(result.seconds, 2),
        "mlflow_run_id": result.run_id,
    }
    with critical():  # trained: recorded before a stop acts
        _write_json(fold_dir / FOLD_FILE, record)
    return record


def _fold_checkpoint(cv_dir: Path, fold: int, record: dict[str, Any], metric: str) -> Any:
    """Fold `fold`'s best.pt, checked to be the model that fold trained (its fold.json)."""
    path = cv_dir / f"fold-{fold}" / "best.pt"
    try:
        checkpoint = read_checkpoint(path)
    except CtscanError as exc:
        raise CtscanError(
            f"fold {fold}'s best.pt cannot be used: {exc.message}", _fold_fix(cv_dir, fold)
        ) from None
    value = record["best"].get(metric)
    if (
        record.get("fold") != fold
        or checkpoint.epoch != record["best_epoch"]
        or value is None
        or not math.isclose(float(checkpoint.best_value), float(value), rel_tol=1e-9)
    ):
        raise CtscanError(
            f"'{path}' is not the model fold {fold} trained (its fold.json records best epoch "
            f"{record['best_epoch']}, {metric} {value}; the file holds epoch {checkpoint.epoch}, "
            f"{checkpoint.best_value}).",
            _fold_fix(cv_dir, fold),
        )
    return checkpoint


def _finished_fold(cv_dir: Path, fold: int, metric: str) -> dict[str, Any] | None:
    """fold.json of a finished fold (its best.pt checked), or None if the fold is not done."""
    path = cv_dir / f"fold-{fold}" / FOLD_FILE
    if not path.is_file():
        return None
    keys = ("fold", "best", "best_epoch", "epochs_run", "held_out_images")
    record = _read_json(path, keys, _fold_fix(cv_dir, fold))
    if not isinstance(record["best"], dict):
        raise CtscanError(
            f"'{path}' is not ctscan's (best is not a table).", _fold_fix(cv_dir, fold)
        )
    _fold_checkpoint(cv_dir, fold, record, metric)
    return record


def _out_of_fold(cv: _Cv, records: list[dict[str, Any]]) -> tuple[np.ndarray, list[Any]]:
    """The raw logits of every train + valid image from the model that did not train on it."""
    plan, metric = cv.plan, cv.settings.train.select_metric
    logits = np.zeros((len(plan.paths), len(cv.store.spec.class_names)), dtype=np.float64)
    checkpoints = []
    for fold, record in enumerate(records, 1):
        checkpoint = _fold_checkpoint(cv.cv_dir, fold, record, metric)
        require_same_spec(checkpoint, cv.store)
        _, held_out = fold_splits(plan, fold - 1)
        out = raw_logits(checkpoint, held_out.images, cv.rt)
        logits[plan.held_out(fold - 1)] = out.cpu().double().numpy()
        checkpoints.append(checkpoint)
    return logits, checkpoints


def _calibrate(cv: _Cv, checkpoints: list[Any], logits: np.ndarray) -> dict[str, Any]:
    """One temperature, fitted on the pooled out-of-fold logits, into every fold's best.pt."""
    names = list(checkpoints[0].class_names)
    report = calibration_report(logits, cv.plan.labels, names, f"out-of-fold ({cv.plan.k} folds)")
    temperature = report["temperature"]
    with critical():  # every fold gets the same T, or none
        for fold, checkpoint in enumerate(checkpoints, 1):
            calibrated = dataclasses.replace(
                checkpoint, temperature=temperature, calibration=report
            )
            save_checkpoint(cv.cv_dir / f"fold-{fold}" / "best.pt", calibrated)
    for fold, checkpoint in enumerate(checkpoints, 1):  # serve's drift reference follows T
        calibrated = dataclasses.replace(checkpoint, temperature=temperature)
        body = json.dumps(train_confidence(calibrated, cv.store, cv.rt)).encode()
        atomic_write(cv.cv_dir / f"fold-{fold}" / CONFIDENCE_FILE, body)
    return report


def _test(cv: _Cv) -> dict[str, Any]:
    """Read the test split, once, after everything else: each fold model and their average."""
    store, names = cv.store, list(cv.store.spec.class_names)
    folds = [cv.cv_dir / f"fold-{fold}" for fold in range(1, cv.plan.k + 1)]
    results = [
        evaluate_checkpoint(
            f / "best.pt", store=store, split="test", rt=cv.rt, out_dir=f / "eval-test"
        )
        for f in folds
    ]
    probs = np.mean(
        [[[p["probabilities"][n] for n in names] for p in r["predictions"]] for r in results],
        axis=0,
    )
    y_true = store.split("test").labels.cpu().numpy()
    mask = leak_free_mask(store, "test")
    averaged = classification_report(y_true, probs, names)
    averaged_free = classification_report(y_true[mask], probs[mask], names) if mask.any() else {}
    keys = ("accuracy", "macro_f1", "ece", "log_loss")
    return {
        "n": len(y_true),
        "leak_free_n": int(mask.sum()),
        "per_fold": {key: _mean_std([r[key] for r in results]) for key in keys},
        "per_fold_leak_free": {
            key: _mean_std([r["leak_free"][key] for r in results if r["leak_free"]])
            for key in ("accuracy", "macro_f1")
        },
        "averaged_probabilities": {key: averaged[key] for key in keys},
        "averaged_probabilities_leak_free": {
            key: averaged_free[key] for key in ("accuracy", "macro_f1") if key in averaged_free
        },
    }


def run_cv(
    settings: Settings,
    k: int,
    *,
    out_dir: Path | None = None,
    say: Callable[[str], None] = say_line,
) -> CvResult:
    """Train K fold models, pool their out-of-fold predictions, calibrate, then test once."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise CtscanError(
            "--folds runs its folds one after another in one process; it does not run under "
            "torchrun.",
            "run `ctscan train --folds K` without torchrun (each fold uses the whole device).",
        )
    if k < 2:
        raise SettingsError(f"--folds {k}: cross-validation needs 2 folds or more.", FOLD_FIX)
    store = open_settings_store(settings)
    plan = plan_folds(store, k, settings.train.seed)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"cv{k}-{settings.model.name}-s{settings.train.seed}-{stamp}"
    cv_dir = out_dir or settings.paths.runs_dir / name
    refuse_reserved_out(cv_dir, settings)
    with folder_lock(ensure_dir(cv_dir, what="cross-validation folder"), what="cross-validation"):
        recorded = _check_same_cv(cv_dir, plan, settings)
        # what the user ran: the command to continue uses
        atomic_write(cv_dir / "settings.toml", to_toml(settings).encode())
        assignment = {**plan.to_dict(), "settings": public_dict(settings)}

        def record(parent_run_id: str | None) -> None:  # where a continue finds the parent
            _write_json(cv_dir / FOLDS_FILE, {**assignment, "parent_run_id": parent_run_id})

        cv = _Cv(settings, store, plan, cv_dir, say)
        try:
            tracker = open_tracker(
                settings.tracking,
                runs_dir=settings.paths.runs_dir,
                run_name=cv_dir.name,
                recorded_id=(recorded or {}).get("parent_run_id"),
                tags={"kind": "cv", TAG_CV: cv_dir.name, "model": settings.model.name},
                params={"cv.folds": k, "cv.seed": plan.seed, "cv.identity": plan.identity},
                experiment_fix=partial(
                    experiment_fix, new="a new cross-validation (another --out)"
                ),
                record=record,
            )
            with tracker:
                if recorded is None and tracker.run_id is None:  # tracking off
                    record(None)
                return _run(cv, tracker)
        except (KeyboardInterrupt, Interrupted) as exc:  # a fold's stop, or one between steps
            if not cv.stage:  # cv.json is written: nothing is left to continue
                raise
            raise stopped(
                "cross-validation",
                exc,
                f" {cv.stage}; finished folds are kept in '{cv_dir}'",
                f"continue with `ctscan train --folds {k} --out {cv_dir} -s "
                f"{cv_dir / 'settings.toml'}`.",
            ) from None


def _run(cv: _Cv, tracker: Any) -> CvResult:
    records = _train_folds(cv, tracker.run_id)
    cv.stage = "after the folds trained"
    check_stop()
    result = _pooled(cv, records)
    result.run_id = tracker.run_id
    test, oof, selection = result.test, result.oof, result.selection
    if test is not None:
        test["gap"] = {  # selection signal minus test: what a user choosing by it is off by
            "oof_accuracy_minus_test": oof["accuracy"] - test["per_fold"]["accuracy"]["mean"],
        }
        if "val_accuracy" in selection:
            test["gap"]["fold_val_accuracy_minus_test"] = (
                selection["val_accuracy"]["mean"] - test["per_fold"]["accuracy"]["mean"]
            )
    result.assignment = {
        key: value
        for key, value in _read_json(cv.cv_dir / FOLDS_FILE, ("k",), "start a new one").items()
        if key not in ("held_out", "settings")
    }
    result.assignment["counts"] = cv.plan.counts(len(cv.store.spec.class_names))
    _write_json(cv.cv_dir / CV_FILE, result.summary())
    cv.stage = ""
    _log(tracker, result, cv.cv_dir)
    return result


def _train_folds(cv: _Cv, parent: str | None) -> list[dict[str, Any]]:
    """Every fold's record: a finished fold's (all checked up front), the others trained."""
    k, metric, say = cv.plan.k, cv.settings.train.select_metric, cv.say
    done = {fold: _finished_fold(cv.cv_dir, fold, metric) for fold in range(1, k + 1)}
    counts = np.array(cv.plan.counts(len(cv.store.spec.class_names)))
    present = counts.sum(axis=0) > 0
    if lacking := [f + 1 for f in range(k) if (present & (counts[f] == 0)).any()]:
        say(
            f"warning: fold(s) {', '.join(map(str, lacking))} hold no image of some class (too "
            "few images per class for this K): their held-out figures miss that class."
        )
    records = []
    for fold in range(1, k + 1):
        record = done[fold]
        if record is not None:
            say(f"fold {fold}/{k}: already trained ({metric} {record['best'][metric]:.4f})")
        else:
            say(f"fold {fold}/{k}: training on the other folds, selecting on fold {fold}")
            cv.stage = f"in fold {fold} of {k}"
            check_stop()  # one swallowed at the end of the fold before acts now
            record = _train_fold(cv, fold, parent)
            say(
                f"fold {fold}/{k}: best epoch {record['best_epoch']}, {metric} "
                f"{record['best'][metric]:.4f}"
            )
        records.append(record)
    return records


def _pooled(cv: _Cv, records: list[dict[str, Any]]) -> CvResult:
    """After the folds: the out-of-fold predictions, the temperature, then the test split."""
    settings, plan, labels = cv.settings, cv.plan, cv.plan.labels
    logits, checkpoints = _out_of_fold(cv, records)
    names = list(cv.store.spec.class_names)
    raw = classification_report(labels, probabilities(logits), names)
    selection = {
        key: _mean_std([r["best"][key] for r in records if key in r["best"]])
        for key in ("val_accuracy", "val_macro_f1", "val_loss")
        if all(key in r["best"] for r in records)
    }
    calibration = _calibrate(cv, checkpoints, logits) if settings.train.calibrate else None
    temperature = calibration["temperature"] if calibration else 1.0
    probs = probabilities(apply_temperature(logits, temperature))
    oof_report = classification_report(labels, probs, names)
    keys = ("accuracy", "macro_f1", "balanced_accuracy", "ece", "log_loss")
    oof = {key: oof_report[key] for key in keys} | {
        "n": len(labels),
        "uncalibrated": {key: raw[key] for key in ("ece", "log_loss")},
    }
    _write_json(
        cv.cv_dir / OOF_FILE,
        [
            {
                "path": path,
                "fold": int(fold) + 1,
                "true": names[int(y)],
                "probabilities": dict(zip(names, map(float, row), strict=True)),
            }
            for path, fold, y, row in zip(plan.paths, plan.fold, labels, probs, strict=True)
        ],
    )
    test = None
    if settings.train.evaluate_test and cv.store.counts.get("test", 0):
        test = _test(cv)
    elif settings.train.evaluate_test:
        cv.say("note: the store's test split is empty: no test figures")
    metric = settings.train.select_metric
    return CvResult(cv.cv_dir, plan.k, metric, records, selection, oof, calibration, test)


def _log(tracker: Any, result: CvResult, cv_dir: Path) -> None:
    metrics = {f"oof_{key}": float(result.oof[key]) for key in ("accuracy", "macro_f1", "ece")}
    for key, stats in result.selection.items():
        metrics[f"cv_{key}_mean"], metrics[f"cv_{key}_std"] = stats["mean"], stats["std"]
    if result.calibration is not None:
        metrics["temperature"] = float(result.calibration["temperature"])
    if result.test is not None:
        for key, stats in result.test["per_fold"].items():
            metrics[f"test_{key}_mean"], metrics[f"test_{key}_std"] = stats["mean"], stats["std"]
        for key, value in result.test["averaged_probabilities"].items():
            metrics[f"test_averaged_{key}"] = float(value)
    tracker.log_metrics(metrics, step=result.k)
    for name in (CV_FILE, FOLDS_FILE, "settings.toml"):
        tracker.log_artifact(cv_dir / name)


def cv_lines(result: CvResult) -> list[str]:
    """The human summary printed on stderr at the end."""
    metric = result.select_metric
    lines = [
        f"fold {r['fold']}: best epoch {r['best_epoch']}/{r['epochs_run']}, {metric} "
        f"{r['best'][metric]:.4f} on {r['held_out_images']} held-out images"
        for r in result.folds
    ]
    for key, stats in result.selection.items():
        lines.append(f"selection {key}: {stats['mean']:.4f} +- {stats['std']:.4f}")
    oof = result.oof
    lines.append(
        f"out-of-fold ({oof['n']} images): accuracy {oof['accuracy']:.4f}, macro-F1 "
        f"{oof['macro_f1']:.4f}, ECE {oof['ece']:.4f}"
    )
    if result.calibration is not None:
        lines.append(f"temperature {result.calibration['temperature']:.3f} (out-of-fold fit)")
    if result.test is not None:
        acc = result.test["per_fold"]["accuracy"]
        lines.append(
            f"test ({result.test['n']} images, read once at the end): fold models accuracy "
            f"{acc['mean']:.4f} +- {acc['std']:.4f}; averaged probabilities "
            f"{result.test['averaged_probabilities']['accuracy']:.4f}"
        )
    lines.append(f"cross-validation: {result.run_dir / CV_FILE}")
    return lines

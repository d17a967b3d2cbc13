"""The one training loop: CPU or CUDA, one process or N under torchrun, AMP, compile, EMA.

`run_training` -> `_train` -> `_run_epochs` (`train_one_epoch`, `validate`, `save_checkpoints`
per epoch) -> `_finish`. `train_step` is shared with `ctscan profile` and the benchmarks.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.profiler import record_function

import ctscan
from ctscan.data.augment import mix_batch, mixed_loss
from ctscan.data.batches import batch_indices, epoch_order, shard
from ctscan.data.reference import CONFIDENCE_FILE
from ctscan.data.store import Split, Store, open_settings_store
from ctscan.engine.calibration import fit_checkpoint, train_confidence
from ctscan.engine.checkpoint import (
    Checkpoint,
    git_commit,
    load_model,
    read_checkpoint,
    save_checkpoint,
)
from ctscan.engine.evaluate import evaluate_checkpoint, log_evaluation, predict
from ctscan.engine.metrics import quick_metrics
from ctscan.engine.modelling import freeze_backbone
from ctscan.engine.plots import plot_curves
from ctscan.engine.progress import Progress
from ctscan.engine.run_folder import (
    RunPlan,
    open_run_dir,
    plan_run,
    record_new_run,
    run_stopped,
    write_result,
)
from ctscan.engine.runtime import (
    Runtime,
    configure_threads,
    init_distributed,
    resolve_runtime,
    rng_state,
    seed_everything,
    shutdown_distributed,
)
from ctscan.engine.state import Loop, TrainState, new_loop, new_train_state, wrap_for_steps
from ctscan.engine.tracking import Tracker, open_tracker
from ctscan.files import atomic_write, ensure_dir, file_sha256, folder_lock
from ctscan.jobs import check_stop, critical
from ctscan.models import unwrap
from ctscan.settings import Settings, flatten, public_dict, to_toml


@dataclass
class TrainResult:
    """What a finished run produced (returned on rank 0 only)."""

    run_dir: Path
    best_path: Path
    last_path: Path
    best_epoch: int
    best_value: float
    select_metric: str
    history: list[dict[str, Any]]
    seconds: float = 0.0
    train_images_per_s: float = 0.0
    test: dict[str, Any] | None = None
    run_id: str | None = None
    model_version: dict[str, Any] | None = None
    stopped_early: bool = False
    calibration: dict[str, Any] | None = None  # the temperature fit on valid (best.pt)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest for the CLI."""
        out: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "best_checkpoint": str(self.best_path),
            "best_epoch": self.best_epoch,
            self.select_metric: self.best_value,
            "epochs_run": len(self.history),
            "stopped_early": self.stopped_early,
            "train_images_per_s": round(self.train_images_per_s, 2),
            "seconds": round(self.seconds, 2),
            "mlflow_run_id": self.run_id,
        }
        if self.model_version:
            out["registered_model"] = self.model_version
        if self.calibration is not None:
            out["temperature"] = self.calibration["temperature"]
            out["calibration"] = self.calibration["status"]
        if self.test is not None:
            keys = ("accuracy", "macro_f1", "ece", "log_loss", "n")
            out["test"] = {k: self.test[k] for k in keys if k in self.test}
            if "ece_floor" in self.test:  # the ECE a perfectly calibrated model would read
                out["test"]["ece_floor_p95"] = self.test["ece_floor"]["p95"]
            if "calibration" in self.test:
                before = self.test["calibration"]["before"]
                out["test"]["ece_uncalibrated"] = before["ece"]
                out["test"]["log_loss_uncalibrated"] = before["log_loss"]
            if leak_free := self.test.get("leak_free"):
                out["test"]["leak_free"] = {
                    k: leak_free[k] for k in ("accuracy", "macro_f1", "n") if k in leak_free
                }
        return out


def train_step(
    state: TrainState, loop: Loop, images: torch.Tensor, labels: torch.Tensor, *, update: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One micro-batch (`images` (B, 1, S, S) uint8, `labels` (B,)): forward, backward and, with
    `update` (the last of an accumulation group), the optimizer step. Detached loss and logits."""
    tr, rt = loop.settings.train, loop.rt
    with record_function("augment"):
        x = loop.model_input(images, train=True)
        x, mixed = mix_batch(x, labels, loop.settings.augment)
    no_sync = (
        state.step_model.no_sync()
        if rt.distributed and not update and hasattr(state.step_model, "no_sync")
        else contextlib.nullcontext()
    )
    with no_sync:
        with record_function("forward"), rt.autocast():
            logits = state.step_model(x)
            loss = mixed_loss(logits.float(), labels, mixed, label_smoothing=tr.label_smoothing)
        with record_function("backward"):
            state.scaler.scale(loss / tr.accumulate).backward()
    if update:
        with record_function("optimizer_step"):
            if tr.grad_clip > 0:
                state.scaler.unscale_(state.optimizer)
                torch.nn.utils.clip_grad_norm_(state.model.parameters(), tr.grad_clip)
            state.scaler.step(state.optimizer)
            state.scaler.update()
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
            if state.ema is not None:
                state.ema.update_parameters(state.model)
    return loss.detach(), logits.detach()


def train_one_epoch(
    state: TrainState,
    loop: Loop,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epoch: int,
    progress: Progress,
    max_steps: int | None = None,
    after_step: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One pass over this rank's shard of the train split; returns loss, accuracy, lr, img/s.

    `max_steps` and `after_step` (run after every step) are for `ctscan profile`.
    """
    tr, rt = loop.settings.train, loop.rt
    order = epoch_order(len(labels), seed=tr.seed, epoch=epoch, shuffle=True)  # seeded, sharded
    mine = shard(order, rt.rank, rt.world_size, pad=True).to(images.device)
    batches = list(batch_indices(mine, tr.batch_size, drop_last=True))[:max_steps]
    state.step_model.train()
    freeze_backbone(state.model, loop.settings, epoch)
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen = 0
    sync = rt.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(rt.device)
    t0 = time.perf_counter()
    for i, idx in enumerate(batches):
        with record_function("data"):
            x, y = images[idx], labels[idx]
        update = (i + 1) % tr.accumulate == 0 or i + 1 == len(batches)
        loss, logits = train_step(state, loop, x, y, update=update)
        loss_sum += loss * len(idx)
        correct += (logits.argmax(1) == y).sum()
        seen += len(idx)
        if after_step is not None:
            after_step()
        if progress.live and (not sync or i % 10 == 0):
            elapsed = max(time.perf_counter() - t0, 1e-9)
            lr = state.optimizer.param_groups[0]["lr"]
            progress.step(float(loss_sum) / seen, float(correct) / seen, lr, seen / elapsed)
    if sync:
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - t0
    seen_t = torch.tensor(seen, device=rt.device, dtype=torch.float64)
    totals = _all_reduce(rt, torch.stack([loss_sum.double(), correct.double(), seen_t]))
    n = max(float(totals[2]), 1.0)
    return {
        "train_loss": float(totals[0]) / n,
        "train_accuracy": float(totals[1]) / n,
        "lr": state.optimizer.param_groups[0]["lr"],
        "train_seconds": seconds,
        "train_images": int(n),
        "train_images_per_s": n / seconds if seconds else 0.0,
    }


def _all_reduce(rt: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks (itself in one process)."""
    if rt.distributed:
        dist.all_reduce(tensor)
    return tensor


def validate(
    model: nn.Module, loop: Loop, images: torch.Tensor, labels: torch.Tensor
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 on a split; each rank takes a disjoint shard, then all-reduce."""
    rt, n = loop.rt, len(labels)
    mine = shard(torch.arange(n), rt.rank, rt.world_size, pad=False)
    logits = predict(
        model,
        images[mine.to(images.device)],
        mean=loop.spec.mean,
        std=loop.spec.std,
        channels=loop.channels,
        rt=rt,
        batch_size=max(loop.settings.train.batch_size, 64),
    )
    idx = mine.to(rt.device)
    both = torch.zeros(2, n, device=rt.device, dtype=torch.float64)  # predictions, losses
    both[0, idx] = logits.argmax(1).double()
    both[1, idx] = F.cross_entropy(logits, labels[idx].to(rt.device), reduction="none").double()
    preds, losses = _all_reduce(rt, both)
    quick = quick_metrics(
        labels.cpu().numpy(), preds.long().cpu().numpy(), len(loop.spec.class_names)
    )
    return {
        "val_loss": float(losses.mean()),
        "val_accuracy": float(quick["accuracy"]),
        "val_macro_f1": float(quick["macro_f1"]),
    }


def _better(value: float, best: float | None, metric: str) -> bool:
    if best is None or math.isnan(best):
        return True
    return value < best if metric == "val_loss" else value > best


def _gather_rng(rt: Runtime) -> list[dict[str, Any]]:
    """Every rank's RNG state (collected on rank 0; each rank resumes its own)."""
    mine = rng_state()
    if not rt.distributed:
        return [mine]
    gathered: list[Any] = [None] * rt.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


# ---- the run ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunHooks:
    """What a caller (cv, sweep) adds to a run: MLflow tags and parent, a say per epoch.

    `on_epoch(row)` runs on every rank (which must answer alike) and returns None to go on, or a
    reason to stop after that epoch, as an early stop does.
    """

    tags: dict[str, str] = field(default_factory=dict)
    parent_run_id: str | None = None
    on_epoch: Callable[[dict[str, Any]], str | None] | None = None


def run_training(
    settings: Settings,
    *,
    out_dir: Path | None = None,
    resume: str | None = None,
    hooks: RunHooks | None = None,
    splits: tuple[Split, Split] | None = None,
) -> TrainResult | None:
    """Train as the settings say; returns the result on rank 0 and None on other ranks.

    `splits` (train, validation) replaces the store's splits: a cross-validation fold (ops/cv.py).
    """
    rt = resolve_runtime(settings.train)
    init_distributed(rt)
    try:
        return _train(settings, rt, out_dir, resume, hooks or RunHooks(), splits)
    finally:
        shutdown_distributed()


def _train(
    settings: Settings,
    rt: Runtime,
    out_dir: Path | None,
    resume: str | None,
    hooks: RunHooks,
    splits: tuple[Split, Split] | None,
) -> TrainResult | None:
    t_start = time.perf_counter()
    tr = settings.train
    configure_threads(tr.threads, rt.world_size)
    seed_everything(tr.seed + rt.rank, tr.deterministic)
    store = open_settings_store(settings)
    plan = plan_run(settings, out_dir, resume, store, fold=splits is not None)
    if store.raw_warning:
        plan.notes.append(f"warning: {store.raw_warning}")
    # Rank 0 owns the run folder: checked writable and locked before any work is done.
    lock = (
        folder_lock(ensure_dir(plan.run_dir, what="run folder"), what="run folder")
        if rt.is_main
        else contextlib.nullcontext()
    )
    with lock:
        if rt.is_main:
            open_run_dir(plan)
        train_split, valid_split = splits or (store.split("train"), store.split("valid"))
        # Both splits live on the training device: images (N, 1, S, S) uint8, labels (N,).
        tensors = tuple(
            t.to(rt.device) for s in (train_split, valid_split) for t in (s.images, s.labels)
        )
        loop = new_loop(settings, rt, store.spec, len(train_split))
        state = new_train_state(settings, rt, store.spec, loop.steps_per_epoch)
        if plan.resume_from is not None:
            state.restore(plan.resume_from, rt.rank)
        wrap_for_steps(state, settings, rt)
        if rt.distributed:
            plan.notes.append(
                f"DDP: {rt.world_size} processes x batch {tr.batch_size} = global batch "
                f"{rt.world_size * tr.batch_size}; train.lr {tr.lr:g} is used as set (not scaled)"
            )
        result = _run_epochs(settings, loop, state, store, plan, tensors, t_start, hooks)
        if result is not None:  # rank 0, the run's end logged and its MLflow run closed
            write_result(plan.run_dir, result.summary())
        return result


def _run_epochs(
    settings: Settings,
    loop: Loop,
    state: TrainState,
    store: Store,
    plan: RunPlan,
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    t_start: float,
    hooks: RunHooks,
) -> TrainResult | None:
    """The epochs, tracked: train, validate, checkpoint, early stop; then `_finish` on rank 0."""
    tr, rt = settings.train, loop.rt
    stop, train_seconds, train_images = None, 0.0, 0
    try:
        tracker = _open_run_record(settings, plan, hooks, rt.is_main)
        with (
            tracker,
            Progress(
                enabled=rt.is_main, quiet=tr.quiet, epochs=tr.epochs, steps=loop.steps_per_epoch
            ) as progress,
        ):
            meta = _run_meta(settings, store, tracker.run_id)
            if rt.is_main:
                _log_run_start(settings, loop.rt, plan, store, tracker, meta)
                for note in plan.notes:
                    progress.log(note)
            for epoch in range(state.epoch + 1, tr.epochs + 1):
                row, improved = _one_epoch(state, loop, tensors, epoch, progress)
                train_seconds += row["train_seconds"]
                train_images += row["train_images"]
                stop = _why_stop(settings, state, epoch, row, hooks)
                save_last = bool(stop) or epoch % tr.checkpoint_every == 0 or epoch == tr.epochs
                # One step: a stop between them would lose this epoch's metrics from MLflow
                # (a resume starts after the saved epoch), or log an epoch no checkpoint holds.
                with critical():
                    save_checkpoints(state, loop, plan.run_dir, meta, best=improved, last=save_last)
                    tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
                check_stop()  # a stop swallowed during the epoch acts now
                progress.epoch_line(row, improved)
                if stop:
                    progress.log(stop)
                    tracker.set_tags({"stop_reason": stop})
                    break
            if not rt.is_main:
                return None
            result = _finish(settings, loop, store, plan.run_dir, state, tracker, progress)
            result.seconds = time.perf_counter() - t_start
            result.train_images_per_s = train_images / train_seconds if train_seconds else 0.0
            result.stopped_early = bool(stop)
            speed = {
                "run_seconds": result.seconds,
                "run_train_images_per_s": result.train_images_per_s,
            }
            tracker.log_metrics(speed, step=len(state.history))
            return result
    except KeyboardInterrupt as exc:
        raise run_stopped(plan.run_dir, exc, state.epoch, tr.checkpoint_every) from None


def _open_run_record(settings: Settings, plan: RunPlan, hooks: RunHooks, is_main: bool) -> Tracker:
    """The run's MLflow run on rank 0: a resumed run's own reopened, else a new one (recorded in
    last.pt at once when resuming)."""
    if not is_main:
        return Tracker()
    resumed = plan.resume_from
    return open_tracker(
        settings.tracking,
        runs_dir=settings.paths.runs_dir,
        run_name=plan.run_dir.name,
        recorded_id=resumed.mlflow_run_id if resumed is not None else None,
        record=partial(record_new_run, plan) if resumed is not None else None,
        tags=hooks.tags,
        parent_run_id=hooks.parent_run_id,
    )


def _one_epoch(
    state: TrainState, loop: Loop, tensors: tuple[torch.Tensor, ...], epoch: int, progress: Progress
) -> tuple[dict[str, Any], bool]:
    """Train and validate epoch `epoch`: its metrics row, and whether it is the best so far."""
    train_x, train_y, valid_x, valid_y = tensors
    progress.start_epoch(epoch)
    t_epoch = time.perf_counter()
    row = train_one_epoch(state, loop, train_x, train_y, epoch=epoch, progress=progress)
    row.update(validate(state.deploy_model, loop, valid_x, valid_y))
    row["epoch"], row["epoch_seconds"] = epoch, time.perf_counter() - t_epoch
    state.epoch = epoch
    state.history.append(row)
    metric = loop.settings.train.select_metric
    improved = _better(row[metric], state.best_value, metric)
    if improved:
        state.best_value, state.best_epoch = row[metric], epoch
    return row, improved


def _why_stop(
    settings: Settings, state: TrainState, epoch: int, row: dict[str, Any], hooks: RunHooks
) -> str | None:
    """Why the run ends after this epoch (early stop, the caller's pruner), or None."""
    tr = settings.train
    stop = None
    if tr.early_stop_patience and epoch - state.best_epoch >= tr.early_stop_patience:
        stop = f"early stop: no {tr.select_metric} gain for {tr.early_stop_patience} epochs"
    if hooks.on_epoch is not None:  # the caller's say: a sweep's pruner
        stop = hooks.on_epoch(dict(row)) or stop
    return stop


def _run_meta(settings: Settings, store: Store, run_id: str | None) -> dict[str, Any]:
    """The checkpoint fields that stay the same for the whole run."""
    return {
        "model_name": settings.model.name,
        "spec": store.spec,
        "settings": public_dict(settings),  # secrets (serve.token) never reach a checkpoint
        "select_metric": settings.train.select_metric,
        "data_hash": store.meta.get("dvc_md5") or store.meta.get("raw_fingerprint"),
        "git_commit": git_commit(),
        "ctscan_version": ctscan.__version__,
        "torch_version": str(torch.__version__),
        "mlflow_run_id": run_id,
    }


def _log_run_start(
    settings: Settings, rt: Runtime, plan: RunPlan, store: Store, tracker: Any, meta: dict[str, Any]
) -> None:
    """settings.toml (what this run uses) in the run folder, params and tags in MLflow."""
    settings_file = atomic_write(plan.run_dir / "settings.toml", to_toml(settings).encode())
    if not tracker.reopened:  # a reopened MLflow run holds its params already; a new one not,
        tracker.log_params(flatten(settings))  # also when it continues a run folder
    tracker.set_tags(
        {
            "git_commit": meta["git_commit"] or "unknown",
            "data_hash": str(meta["data_hash"]),
            "device": str(rt.device),
            "precision": rt.precision,
            "world_size": str(rt.world_size),
            "torch_version": meta["torch_version"],
            "model": settings.model.name,
        }
    )
    tracker.log_artifact(settings_file)
    if (audit_json := store.path / "audit.json").is_file():
        tracker.log_artifact(audit_json)


def save_checkpoints(
    state: TrainState, loop: Loop, run_dir: Path, meta: dict[str, Any], *, best: bool, last: bool
) -> None:
    """best.pt when the epoch improved, last.pt (with the training state) when due: rank 0."""
    rt = loop.rt
    rng = _gather_rng(rt) if last else []  # every rank takes part in the gather
    if not rt.is_main or not (best or last):
        return
    common = {
        **meta,
        "model_state": unwrap(state.deploy_model).state_dict(),
        "epoch": state.epoch,
        "history": list(state.history),
        "best_value": state.best_value,
        "best_epoch": state.best_epoch,
    }
    if best:
        save_checkpoint(run_dir / "best.pt", Checkpoint(kind="best", **common))
    if last:
        training = state.training_payload(rng)
        save_checkpoint(run_dir / "last.pt", Checkpoint(kind="last", training=training, **common))


def _finish(
    settings: Settings,
    loop: Loop,
    store: Store,
    run_dir: Path,
    state: TrainState,
    tracker: Any,
    progress: Progress,
) -> TrainResult:
    """Curves, calibration, test evaluation of the best checkpoint, model logging: rank 0 only."""
    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    tracker.log_artifact(plot_curves(state.history, run_dir / "curves.png"))
    calibration = None
    if settings.train.calibrate:  # before anything reads best.pt's probabilities
        calibration = calibrate_best(best_path, store, loop.rt, tracker, progress)
        moved = ("ece_before", "ece_after", "log_loss_before", "log_loss_after")
        tracker.log_metrics(
            {"temperature": calibration["temperature"]}
            | {f"val_{k}": calibration[k] for k in moved if k in calibration},
            step=len(state.history),
        )
    check_stop()  # between calibration and the test split
    test = None
    if settings.train.evaluate_test and not store.counts.get("test", 0):
        progress.log("note: the store's test split is empty: no test figures")
    elif settings.train.evaluate_test:
        test = evaluate_checkpoint(
            best_path, store=store, split="test", rt=loop.rt, out_dir=run_dir / "eval-test"
        )
        progress.log(
            f"test (best epoch {state.best_epoch}): accuracy {test['accuracy']:.4f} "
            f"macro-F1 {test['macro_f1']:.4f} on {test['n']} images"
        )
        log_evaluation(tracker, test, step=len(state.history))
    # The best model's calibrated confidence (max softmax of logits / T) on train: serve's drift
    # reference, the same probabilities the server shows.
    reference = train_confidence(read_checkpoint(best_path), store, loop.rt)
    tracker.log_artifact(atomic_write(run_dir / CONFIDENCE_FILE, json.dumps(reference).encode()))
    best_value = float(state.best_value) if state.best_value is not None else float("nan")
    model_version = None
    if settings.tracking.enabled and settings.tracking.log_model:
        model_version = log_best_model(settings, best_path, tracker, best_value)
    return TrainResult(
        run_dir=run_dir,
        best_path=best_path,
        last_path=last_path,
        best_epoch=state.best_epoch,
        best_value=best_value,
        select_metric=settings.train.select_metric,
        history=state.history,
        test=test,
        run_id=tracker.run_id,
        model_version=model_version,
        calibration=calibration,
    )


def calibrate_best(
    best_path: Path, store: Store, rt: Runtime, tracker: Any, progress: Progress
) -> dict[str, Any]:
    """Fit best.pt's temperature on the validation split and write it into best.pt."""
    best = read_checkpoint(best_path)
    calibrated, report = fit_checkpoint(best, store, rt)
    if (calibrated.temperature, calibrated.calibration) != (best.temperature, best.calibration):
        save_checkpoint(best_path, calibrated)  # a resumed run's unbeaten best.pt stays as it was
    line = f"calibration: {calibrated.calibration_text}"
    if "ece_before" in report:
        line += (
            f"; valid ECE {report['ece_before']:.4f} -> {report['ece_after']:.4f}, "
            f"log-loss {report['log_loss_before']:.4f} -> {report['log_loss_after']:.4f}"
        )
    progress.log(line)
    if report.get("note"):
        progress.log(f"calibration note: {report['note']}")
    tracker.set_tags({"calibration": calibrated.calibration_text})
    return report


def log_best_model(
    settings: Settings, best_path: Path, tracker: Any, best_value: float
) -> dict[str, Any] | None:
    """Log best.pt as an MLflow model that takes uint8 gray images, with its spec; maybe promote."""
    loaded = load_model(best_path)
    spec = loaded.spec
    example = torch.zeros(1, 1, spec.image_size, spec.image_size, dtype=torch.uint8).numpy()
    metadata = {
        "model_name": loaded.checkpoint.model_name,
        "class_names": list(spec.class_names),
        "preprocess": spec.to_dict(),
        "input": "uint8 gray images (B, 1, S, S) after decode + resize; normalised inside",
        "ctscan_version": ctscan.__version__,
        "checkpoint_sha256": file_sha256(best_path),
        "epoch": loaded.checkpoint.epoch,
        "temperature": loaded.temperature,  # inside the model: it returns logits / temperature
        "calibration": loaded.checkpoint.calibration,
        settings.train.select_metric: best_value,
    }
    return tracker.log_model(
        loaded.deployable(),
        input_example=example,
        metadata=metadata,
        select_metric=settings.train.select_metric,
        select_value=best_value,
        higher_is_better=settings.train.select_metric != "val_loss",
    )

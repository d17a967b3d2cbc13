"""The one training loop: CPU or CUDA, one process or N under torchrun, AMP, compile, EMA."""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

import ctscan
from ctscan.data.augment import to_model_input
from ctscan.data.batches import batch_indices, epoch_order, shard, steps_per_epoch
from ctscan.data.store import Store, open_store
from ctscan.engine import checkpoint as ckpt_io
from ctscan.engine.evaluate import evaluate_checkpoint, predict
from ctscan.engine.metrics import quick_metrics
from ctscan.engine.modelling import (
    backbone_frozen,
    build,
    build_from_checkpoint,
    freeze_backbone,
    model_channels,
)
from ctscan.engine.progress import Progress
from ctscan.engine.runtime import (
    Runtime,
    configure_threads,
    init_distributed,
    resolve_runtime,
    rng_state,
    seed_everything,
    set_rng_state,
    shutdown_distributed,
)
from ctscan.errors import CheckpointError, CtscanError
from ctscan.settings import Settings, flatten, to_toml


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
    seconds: float
    train_images_per_s: float
    test: dict[str, Any] | None = None
    run_id: str | None = None
    model_version: dict[str, Any] | None = None
    stopped_early: bool = False

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
        if self.test is not None:
            out["test"] = {k: self.test[k] for k in ("accuracy", "macro_f1", "n") if k in self.test}
            leak_free = self.test.get("leak_free")
            if leak_free:
                out["test"]["leak_free"] = {
                    k: leak_free[k] for k in ("accuracy", "macro_f1", "n") if k in leak_free
                }
        return out


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an interrupt so the run closes cleanly."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 over the remaining steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights (1-d tensors)."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _make_optimizer(model: torch.nn.Module, settings: Settings, rt: Runtime) -> Any:
    groups = _param_groups(model, settings.train.weight_decay)
    kwargs: dict[str, Any] = {"lr": settings.train.lr, "betas": (0.9, 0.999)}
    if rt.device.type == "cuda":
        kwargs["fused"] = True
    return torch.optim.AdamW(groups, **kwargs)


def _better(value: float, best: float | None, metric: str) -> bool:
    if best is None or math.isnan(best):
        return True
    return value < best if metric == "val_loss" else value > best


def _default_run_dir(settings: Settings) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return settings.paths.runs_dir / f"{settings.model.name}-s{settings.train.seed}-{stamp}"


def _resolve_resume(resume: str | None, out_dir: Path | None, settings: Settings) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    if out_dir is not None:
        last = out_dir / "last.pt"
        return last if last.is_file() else None
    runs = sorted(
        settings.paths.runs_dir.glob(f"{settings.model.name}-s{settings.train.seed}-*/last.pt"),
        key=lambda p: p.stat().st_mtime,
    )
    return runs[-1] if runs else None


def _check_resume_fits(state: dict[str, Any], settings: Settings, store: Store, path: Path) -> None:
    if state["model_name"] != settings.model.name:
        raise CheckpointError(
            f"checkpoint '{path}' holds a {state['model_name']} model, "
            f"but model.name is {settings.model.name}.",
            f"resume with --model {state['model_name']} or start a new run.",
        )
    if state["preprocess"] != store.spec.to_dict():
        raise CheckpointError(
            f"checkpoint '{path}' was trained on another processed store "
            f"({state['preprocess']} vs {store.spec.to_dict()}).",
            "preprocess with the settings of that run, or start a new run.",
        )


def _validate(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    store: Store,
    channels: int,
    rt: Runtime,
    batch_size: int,
) -> dict[str, float]:
    """Loss, accuracy and macro-F1 on a split; each rank takes a disjoint shard, then all-reduce."""
    n = len(labels)
    mine = shard(torch.arange(n), rt.rank, rt.world_size, pad=False)
    logits = predict(
        model,
        images[mine.to(images.device)],
        mean=store.spec.mean,
        std=store.spec.std,
        channels=channels,
        rt=rt,
        batch_size=batch_size,
    )
    y = labels[mine.to(labels.device)].to(rt.device)
    preds = torch.zeros(n, device=rt.device, dtype=torch.float64)
    losses = torch.zeros(n, device=rt.device, dtype=torch.float64)
    idx = mine.to(rt.device)
    preds[idx] = logits.argmax(1).double()
    losses[idx] = F.cross_entropy(logits, y, reduction="none").double()
    if rt.distributed:
        import torch.distributed as dist

        dist.all_reduce(preds)
        dist.all_reduce(losses)
    y_true = labels.cpu().numpy()
    y_pred = preds.long().cpu().numpy()
    quick = quick_metrics(y_true, y_pred, len(store.spec.class_names))
    return {
        "val_loss": float(losses.mean()),
        "val_accuracy": float(quick["accuracy"]),
        "val_macro_f1": float(quick["macro_f1"]),
    }


def run_training(
    settings: Settings, *, out_dir: Path | None = None, resume: str | None = None
) -> TrainResult | None:
    """Train as the settings say; returns the result on rank 0 and None on other ranks."""
    rt = resolve_runtime(settings.train)
    init_distributed(rt)
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _train(settings, rt, out_dir, resume)
    finally:
        signal.signal(signal.SIGTERM, previous)
        shutdown_distributed()


def _train(
    settings: Settings, rt: Runtime, out_dir: Path | None, resume: str | None
) -> TrainResult | None:
    t_start = time.perf_counter()
    tr = settings.train
    configure_threads(tr.threads, rt.world_size)
    seed_everything(tr.seed + rt.rank, tr.deterministic)

    store = open_store(settings.paths.processed_dir, expect_data=settings.data.model_dump())
    spec = store.spec
    train_split, valid_split = store.split("train"), store.split("valid")
    # The whole split lives on the training device as uint8: (N, 1, S, S).
    train_x = train_split.images.to(rt.device)
    train_y = train_split.labels.to(rt.device)
    valid_x = valid_split.images.to(rt.device)
    valid_y = valid_split.labels.to(rt.device)

    resume_path = _resolve_resume(resume, out_dir, settings)
    run_dir = out_dir or (resume_path.parent if resume_path else _default_run_dir(settings))
    if resume_path is None and (run_dir / "last.pt").exists():
        raise CtscanError(
            f"run folder '{run_dir}' already holds a checkpoint (last.pt).",
            "pass --resume auto to continue that run, or choose another --out.",
        )

    model = build(settings, image_size=spec.image_size, num_classes=len(spec.class_names))
    channels = model_channels(settings.model.name)
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = _make_optimizer(model, settings, rt)
    n_steps = steps_per_epoch(len(train_y), tr.batch_size, rt.world_size)
    updates_per_epoch = max(1, n_steps // tr.accumulate)
    total_updates = updates_per_epoch * tr.epochs
    warmup = round(tr.warmup_epochs * updates_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=total_updates)
    )
    scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.use_scaler)
    ema = None
    if tr.ema:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(
            model, multi_avg_fn=get_ema_multi_avg_fn(tr.ema_decay), use_buffers=True
        )

    start_epoch, history, best_value, best_epoch = 1, [], None, 0
    if resume_path is not None:
        state = ckpt_io.load_checkpoint(resume_path, map_location=rt.device)
        _check_resume_fits(state, settings, store, resume_path)
        ckpt_io.load_model_state(model, state["model_state"], source=resume_path)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        if ema is not None and state.get("ema_state") is not None:
            ema.load_state_dict(state["ema_state"])
        set_rng_state(state["rng"][min(rt.rank, len(state["rng"]) - 1)])
        start_epoch = state["epoch"] + 1
        history = list(state["history"])
        best_value, best_epoch = state.get("best_value"), state.get("best_epoch", 0)

    raw_model = model
    train_model: torch.nn.Module = model
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # A backbone frozen for the first epochs gets no gradients then: DDP must look for
        # parameters that took no part in the step instead of waiting for their gradients.
        train_model = DistributedDataParallel(
            model,
            device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=backbone_frozen(settings, 1),
        )
    if rt.compile:
        train_model = torch.compile(train_model)

    from ctscan.engine.tracking import Tracker, open_tracker

    tracker = (
        open_tracker(settings.tracking, runs_dir=settings.paths.runs_dir, run_name=run_dir.name)
        if rt.is_main
        else Tracker()
    )
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "settings.toml").write_text(to_toml(settings))
    meta = {
        "model_name": settings.model.name,
        "preprocess": spec.to_dict(),
        "class_names": list(spec.class_names),
        "settings": settings.model_dump(mode="json"),
        "data_hash": store.meta.get("dvc_md5") or store.meta.get("raw_fingerprint"),
        "git_commit": ckpt_io.git_commit(),
        "ctscan_version": ctscan.__version__,
        "torch_version": str(torch.__version__),
    }
    stopped_early = False
    train_seconds, train_images = 0.0, 0
    with (
        tracker,
        Progress(enabled=rt.is_main, quiet=tr.quiet, epochs=tr.epochs, steps=n_steps) as progress,
    ):
        tracker.log_params(flatten(settings))
        tracker.set_tags(
            {
                "git_commit": meta["git_commit"] or "unknown",
                "data_hash": str(meta["data_hash"]),
                "device": str(rt.device),
                "precision": rt.precision,
                "world_size": str(rt.world_size),
                "torch_version": str(torch.__version__),
                "model": settings.model.name,
            }
        )
        tracker.log_artifact(run_dir / "settings.toml")
        audit_json = store.path / "audit.json"
        if audit_json.is_file():
            tracker.log_artifact(audit_json)
        if resume_path is not None:
            progress.log(f"resumed from {resume_path} at epoch {start_epoch}")
        for epoch in range(start_epoch, tr.epochs + 1):
            progress.start_epoch(epoch)
            t_epoch = time.perf_counter()
            row = _train_one_epoch(
                train_model,
                raw_model,
                ema,
                optimizer,
                scheduler,
                scaler,
                train_x,
                train_y,
                store=store,
                channels=channels,
                settings=settings,
                rt=rt,
                epoch=epoch,
                progress=progress,
            )
            train_seconds += row["train_seconds"]
            train_images += row["train_images"]
            eval_model = ema.module if ema is not None else raw_model
            row.update(
                _validate(
                    eval_model,
                    valid_x,
                    valid_y,
                    store=store,
                    channels=channels,
                    rt=rt,
                    batch_size=max(tr.batch_size, 64),
                )
            )
            row["epoch"] = epoch
            row["epoch_seconds"] = time.perf_counter() - t_epoch
            history.append(row)
            value = row[tr.select_metric]
            improved = _better(value, best_value, tr.select_metric)
            if improved:
                best_value, best_epoch = value, epoch
            if rt.is_main:
                payload = {
                    **meta,
                    "model_state": ckpt_io.unwrap(eval_model).state_dict(),
                    "epoch": epoch,
                    "history": history,
                    "best_value": best_value,
                    "best_epoch": best_epoch,
                    "select_metric": tr.select_metric,
                }
                if improved:
                    ckpt_io.save_checkpoint(run_dir / "best.pt", payload)
            save_last = epoch % tr.checkpoint_every == 0 or epoch == tr.epochs
            patience = tr.early_stop_patience
            stop = bool(patience) and epoch - best_epoch >= patience
            if rt.is_main and (save_last or stop):
                payload.update(
                    {
                        "model_state": raw_model.state_dict(),
                        "ema_state": ema.state_dict() if ema is not None else None,
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "scaler": scaler.state_dict(),
                        "rng": _gather_rng(rt),
                    }
                )
                ckpt_io.save_checkpoint(run_dir / "last.pt", payload)
            elif save_last or stop:
                _gather_rng(rt)
            tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=epoch)
            progress.epoch_line(row, improved)
            if stop:
                stopped_early = True
                progress.log(f"early stop: no {tr.select_metric} gain for {patience} epochs")
                break

        result = None
        if rt.is_main:
            result = _finish(
                settings,
                rt,
                store,
                run_dir,
                history,
                best_epoch,
                best_value,
                tracker,
                progress,
                channels,
            )
            result.seconds = time.perf_counter() - t_start
            result.train_images_per_s = train_images / train_seconds if train_seconds else 0.0
            result.stopped_early = stopped_early
            tracker.log_metrics(
                {
                    "run_seconds": result.seconds,
                    "run_train_images_per_s": result.train_images_per_s,
                },
                step=len(history),
            )
    return result


def _gather_rng(rt: Runtime) -> list[dict[str, Any]]:
    """Every rank's RNG state (collected on rank 0; each rank resumes its own)."""
    mine = rng_state()
    if not rt.distributed:
        return [mine]
    import torch.distributed as dist

    gathered: list[Any] = [None] * rt.world_size
    dist.all_gather_object(gathered, mine)
    return gathered


def _train_one_epoch(
    train_model: torch.nn.Module,
    raw_model: torch.nn.Module,
    ema: Any,
    optimizer: Any,
    scheduler: Any,
    scaler: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    store: Store,
    channels: int,
    settings: Settings,
    rt: Runtime,
    epoch: int,
    progress: Progress,
) -> dict[str, Any]:
    """One pass over this rank's shard; returns train loss/accuracy, lr and throughput."""
    tr = settings.train
    aug = settings.augment if settings.augment.enabled else None
    order = epoch_order(len(labels), seed=tr.seed, epoch=epoch, shuffle=True)
    mine = shard(order, rt.rank, rt.world_size, pad=True).to(images.device)
    batches = list(batch_indices(mine, tr.batch_size, drop_last=True))
    train_model.train()
    freeze_backbone(raw_model, backbone_frozen(settings, epoch))
    loss_sum = torch.zeros((), device=rt.device)
    correct = torch.zeros((), device=rt.device, dtype=torch.long)
    seen = 0
    sync = rt.device.type == "cuda"
    if sync:
        torch.cuda.synchronize(rt.device)
    t0 = time.perf_counter()
    for i, idx in enumerate(batches):
        x = to_model_input(
            images[idx],
            mean=store.spec.mean,
            std=store.spec.std,
            channels=channels,
            aug=aug,
            channels_last=rt.channels_last,
        )
        y = labels[idx]
        last_micro = (i + 1) % tr.accumulate == 0 or i + 1 == len(batches)
        no_sync = (
            train_model.no_sync()
            if rt.distributed and not last_micro and hasattr(train_model, "no_sync")
            else contextlib.nullcontext()
        )
        with no_sync:
            with rt.autocast():
                logits = train_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=tr.label_smoothing)
            scaler.scale(loss / tr.accumulate).backward()
        if last_micro:
            if tr.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tr.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update_parameters(raw_model)
        loss_sum += loss.detach() * len(idx)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(idx)
        if progress.enabled and not progress.quiet and (not sync or i % 10 == 0):
            elapsed = time.perf_counter() - t0
            progress.step(
                float(loss_sum) / seen,
                float(correct) / seen,
                optimizer.param_groups[0]["lr"],
                seen * rt.world_size / max(elapsed, 1e-9),
            )
    if sync:
        torch.cuda.synchronize(rt.device)
    seconds = time.perf_counter() - t0
    stats = torch.stack([loss_sum.double(), correct.double(), torch.tensor(seen, device=rt.device)])
    if rt.distributed:
        import torch.distributed as dist

        dist.all_reduce(stats)
    total = max(float(stats[2]), 1.0)
    return {
        "train_loss": float(stats[0]) / total,
        "train_accuracy": float(stats[1]) / total,
        "lr": optimizer.param_groups[0]["lr"],
        "train_seconds": seconds,
        "train_images": int(total),
        "train_images_per_s": total / seconds if seconds else 0.0,
    }


def _finish(
    settings: Settings,
    rt: Runtime,
    store: Store,
    run_dir: Path,
    history: list[dict[str, Any]],
    best_epoch: int,
    best_value: float | None,
    tracker: Any,
    progress: Progress,
    channels: int,
) -> TrainResult:
    """Curves, test evaluation of the best checkpoint, model logging: rank 0 only."""
    from ctscan.engine.plots import plot_curves

    best_path, last_path = run_dir / "best.pt", run_dir / "last.pt"
    curves = plot_curves(history, run_dir / "curves.png")
    tracker.log_artifact(curves)
    test = None
    if settings.train.evaluate_test:
        test = evaluate_checkpoint(
            best_path, store=store, split="test", rt=rt, out_dir=run_dir / "eval-test"
        )
        progress.log(
            f"test (best epoch {best_epoch}): accuracy {test['accuracy']:.4f} "
            f"macro-F1 {test['macro_f1']:.4f} on {test['n']} images"
        )
        tracker.log_metrics(
            {
                "test_accuracy": test["accuracy"],
                "test_macro_f1": test["macro_f1"],
                "test_balanced_accuracy": test["balanced_accuracy"],
            },
            step=len(history),
        )
        for path in sorted((run_dir / "eval-test").iterdir()):
            tracker.log_artifact(path, artifact_path="eval-test")
    model_version = None
    if settings.tracking.enabled and settings.tracking.log_model:
        model_version = _log_model(settings, store, best_path, tracker, channels, best_value)
    return TrainResult(
        run_dir=run_dir,
        best_path=best_path,
        last_path=last_path,
        best_epoch=best_epoch,
        best_value=float(best_value) if best_value is not None else float("nan"),
        select_metric=settings.train.select_metric,
        history=history,
        seconds=0.0,
        train_images_per_s=0.0,
        test=test,
        run_id=tracker.run_id,
        model_version=model_version,
    )


def _log_model(
    settings: Settings,
    store: Store,
    best_path: Path,
    tracker: Any,
    channels: int,
    best_value: float | None,
) -> dict[str, Any] | None:
    """Log the best weights (on CPU, fp32) as an MLflow model and maybe promote it."""
    # The checkpoint's own weights: no ImageNet weights are loaded only to be overwritten.
    model = build_from_checkpoint(ckpt_io.load_checkpoint(best_path), source=best_path)
    spec = store.spec
    example = torch.zeros(1, channels, spec.image_size, spec.image_size).numpy()
    return tracker.log_model(
        model,
        input_example=example,
        select_metric=settings.train.select_metric,
        select_value=float(best_value) if best_value is not None else float("nan"),
        higher_is_better=settings.train.select_metric != "val_loss",
    )

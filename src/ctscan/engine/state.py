"""The training state: what a run builds (for train, profile and the benchmarks), last.pt saves
and a resume restores."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ctscan.data.augment import augment
from ctscan.data.batches import steps_per_epoch
from ctscan.data.transforms import PreprocessSpec, model_input
from ctscan.engine.checkpoint import Checkpoint
from ctscan.engine.modelling import backbone_frozen, build, freeze_backbone, load_model_state
from ctscan.engine.runtime import Runtime, set_rng_state
from ctscan.models import input_channels
from ctscan.settings import Settings


@dataclass(frozen=True)
class Loop:
    """What stays fixed during a run: settings, runtime, input spec, and the step schedule."""

    settings: Settings
    rt: Runtime
    spec: PreprocessSpec
    channels: int
    steps_per_epoch: int
    augment: Callable[[torch.Tensor], torch.Tensor] | None

    def model_input(self, images: torch.Tensor, *, train: bool) -> torch.Tensor:
        """uint8 (B, 1, S, S) on the device -> the model's (B, C, S, S) float input."""
        return model_input(
            images,
            mean=self.spec.mean,
            std=self.spec.std,
            channels=self.channels,
            augment=self.augment if train else None,
            channels_last=self.rt.channels_last,
        )


@dataclass
class TrainState:
    """Everything that changes while training: what last.pt saves and a resume restores."""

    model: nn.Module  # the plain model whose weights are trained
    step_model: nn.Module  # the same model behind DDP / torch.compile: forward + backward
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    ema: AveragedModel | None
    epoch: int = 0  # epochs finished
    history: list[dict[str, Any]] = field(default_factory=list)
    best_value: float | None = None
    best_epoch: int = 0

    @property
    def deploy_model(self) -> nn.Module:
        """The weights a checkpoint deploys: the EMA when on, else the trained weights."""
        return self.ema.module if self.ema is not None else self.model

    def training_payload(self, rng: list[dict[str, Any]]) -> dict[str, Any]:
        """last.pt's `training` entry."""
        return {
            "model_state": self.model.state_dict(),
            "ema_state": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng,
        }

    def restore(self, checkpoint: Checkpoint, rank: int) -> None:
        """Continue from last.pt: weights, optimizer, schedule, scaler, EMA, RNG, history."""
        training = checkpoint.training or {}
        load_model_state(self.model, training["model_state"], source=checkpoint.source or "")
        self.optimizer.load_state_dict(training["optimizer"])
        self.scheduler.load_state_dict(training["scheduler"])
        self.scaler.load_state_dict(training["scaler"])
        if self.ema is not None and training.get("ema_state") is not None:
            self.ema.load_state_dict(training["ema_state"])
        rngs = training["rng"]
        set_rng_state(rngs[min(rank, len(rngs) - 1)])
        self.epoch = checkpoint.epoch
        self.history = list(checkpoint.history)
        self.best_value, self.best_epoch = checkpoint.best_value, checkpoint.best_epoch


def lr_factor(step: int, *, warmup: int, total: int) -> float:
    """Linear warmup to 1, then cosine decay to 0 over the remaining steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def ema_decay_at(n_averaged: int, decay: float, *, warmup: bool) -> float:
    """The EMA decay of the update after `n_averaged` earlier ones.

    `warmup` as TensorFlow's ExponentialMovingAverage with num_updates: the average spans about
    the last ninth of the steps until that reaches `decay`, so it never carries the initial
    weights far into training (without it, at 0.99 it still holds 0.99^n of them).
    """
    return min(decay, (1 + n_averaged) / (10 + n_averaged)) if warmup else decay


def ema_update(decay: float, *, warmup: bool) -> Callable[..., None]:
    """AveragedModel's `multi_avg_fn`: torch's EMA step at `ema_decay_at`'s decay; `n` is its
    `n_averaged` buffer, saved in last.pt, so a resumed run goes on with the same decay."""

    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], n: torch.Tensor) -> None:
        get_ema_multi_avg_fn(ema_decay_at(int(n), decay, warmup=warmup))(ema_params, params, n)

    return update


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No weight decay on biases and normalisation weights (1-d tensors)."""
    params = list(model.parameters())
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]


def new_loop(settings: Settings, rt: Runtime, spec: PreprocessSpec, n_train: int) -> Loop:
    """The Loop of a run: settings, runtime, input spec, steps per epoch, augmentation."""
    return Loop(
        settings=settings,
        rt=rt,
        spec=spec,
        channels=input_channels(settings.model.name),
        steps_per_epoch=steps_per_epoch(n_train, settings.train.batch_size, rt.world_size),
        augment=(lambda x: augment(x, settings.augment)) if settings.augment.enabled else None,
    )


def new_train_state(
    settings: Settings, rt: Runtime, spec: PreprocessSpec, steps: int
) -> TrainState:
    """A fresh model, AdamW, warmup + cosine schedule, grad scaler and EMA, on the device."""
    tr = settings.train
    model = build(settings, image_size=spec.image_size, num_classes=len(spec.class_names))
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(
        _param_groups(model, tr.weight_decay),
        lr=tr.lr,
        betas=(0.9, 0.999),
        **({"fused": True} if rt.device.type == "cuda" else {}),
    )
    updates_per_epoch = max(1, steps // tr.accumulate)
    total, warmup = updates_per_epoch * tr.epochs, round(tr.warmup_epochs * updates_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, warmup=warmup, total=total)
    )
    average = ema_update(tr.ema_decay, warmup=tr.ema_warmup)
    ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True) if tr.ema else None
    return TrainState(
        model=model,
        step_model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16"),
        ema=ema,
    )


def wrap_for_steps(state: TrainState, settings: Settings, rt: Runtime) -> None:
    """DDP around the model under torchrun, then torch.compile when on: `state.step_model`."""
    step_model: nn.Module = state.model
    # The stages frozen for all of training are frozen before DDP is built, so that it leaves
    # them out of its gradient buckets.
    freeze_backbone(state.model, settings, epoch=settings.model.freeze_epochs + 1)
    if rt.distributed:
        from torch.nn.parallel import DistributedDataParallel

        # A backbone frozen for the first epochs gets no gradients then: DDP must look for
        # parameters that took no part in the step instead of waiting for their gradients.
        step_model = DistributedDataParallel(
            step_model,
            device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
            find_unused_parameters=backbone_frozen(settings, 1),
        )
    if rt.compile:
        step_model = torch.compile(step_model)
    state.step_model = step_model

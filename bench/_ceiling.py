"""Training-step throughput of a model on synthetic tensors: the ceiling a real loop can reach.

Importable from other bench scripts (bench/ is not a package):

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _ceiling import synthetic_throughput
"""

from __future__ import annotations

import os
import statistics
import time
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def first_conv_channels(model: nn.Module) -> int:
    """Input channels of the model's first Conv2d."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(f"{type(model).__name__} has no Conv2d to read the input channels from")


def synthetic_throughput(
    model: nn.Module,
    batch: int = 32,
    size: int = 224,
    device: str = "cpu",
    precision: str = "fp32",
    channels_last: bool = False,
    compile: bool = False,
    steps: int = 10,
    warmup: int = 3,
    *,
    in_channels: int | None = None,
    num_classes: int = 4,
) -> dict[str, Any]:
    """Time forward + backward + AdamW step on one fixed random batch; median over `steps`.

    The first `warmup` steps (compilation, allocator and cuDNN warm-up) are not timed; their
    total is reported as `warmup_s`. The model is trained in place (its weights change).
    """
    if precision not in DTYPES:
        raise ValueError(f"precision must be one of {sorted(DTYPES)}, got {precision!r}")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    in_channels = in_channels or first_conv_channels(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format

    model = model.to(dev, memory_format=memory_format).train()
    x = torch.randn(batch, in_channels, size, size, device=dev)  # (B, C, S, S) float32
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, num_classes, (batch,), device=dev)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    step_model = torch.compile(model) if compile else model
    dtype = DTYPES[precision]
    autocast = torch.autocast(dev.type, dtype=dtype) if dtype is not None else nullcontext()
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "fp16")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    def step() -> torch.Tensor:
        with autocast:
            loss = nn.functional.cross_entropy(step_model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return loss

    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    load_before = os.getloadavg()[0]
    times = []
    for _ in range(warmup + steps):
        sync()
        start = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - start)
    timed = times[warmup:]
    step_s = statistics.median(timed)
    return {
        "batch": batch,
        "size": size,
        "in_channels": in_channels,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if cuda else "cpu",
        "precision": precision,
        "channels_last": channels_last,
        "compile": compile,
        "steps": steps,
        "warmup": warmup,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_ms_median": 1000 * step_s,
        "step_ms_min": 1000 * min(timed),
        "step_ms_max": 1000 * max(timed),
        "images_per_s": batch / step_s,
        "warmup_s": sum(times[:warmup]),
        "peak_memory_mib": torch.cuda.max_memory_allocated(dev) / 2**20 if cuda else None,
        "final_loss_finite": bool(torch.isfinite(loss).item()),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": [load_before, os.getloadavg()[0]],  # before, after: > cpu_count = contended
    }

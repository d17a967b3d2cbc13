"""`ctscan profile`: torch.profiler around the real training loop; trace, top operators, summary.

`train_one_epoch` runs `wait + warmup + active` steps of the run `ctscan train` would build; the
active ones are recorded. The summary's split: the loop's `record_function` ranges as fractions
of the summed "ProfilerStep#" host wall times (docs/profile.md).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

import ctscan
from ctscan.data.store import Store, open_settings_store
from ctscan.engine.modelling import backbone_frozen
from ctscan.engine.progress import Progress
from ctscan.engine.runtime import Runtime, configure_threads, resolve_runtime, seed_everything
from ctscan.engine.state import Loop, TrainState, new_loop, new_train_state, wrap_for_steps
from ctscan.engine.tracking import open_tracker
from ctscan.engine.train import train_one_epoch
from ctscan.errors import CtscanError
from ctscan.files import atomic_write, ensure_dir, folder_lock
from ctscan.settings import Settings, flatten, to_toml

WAIT_STEPS = 1
TOP_N = 25
INPUT_RANGES = ("data", "augment")
MODEL_RANGES = ("forward", "backward", "optimizer_step")
LOOP_RANGES = INPUT_RANGES + MODEL_RANGES
STEP_EVENT = "ProfilerStep"  # torch names the active steps ProfilerStep#<n> in the trace
TRACE_FILE = "trace.json.gz"
TENSORBOARD_DIR = "tensorboard"
TOP_OPS_FILE = "top_ops.txt"
SUMMARY_FILE = "summary.json"
SETTINGS_FILE = "settings.toml"
TB_TRACE_GLOB = "*.pt.trace.json*"
MB = 1024 * 1024


@dataclass
class ProfileResult:
    """What `run_profile` wrote: the folder and the summary (as in summary.json)."""

    out_dir: Path
    summary: dict[str, Any]


def warmup_steps(device: torch.device) -> int:
    """Steps run under the profiler before recording: 2 on CUDA (cuDNN autotune), else 1."""
    return 2 if device.type == "cuda" else 1


def profiled_epoch(settings: Settings) -> int:
    """The epoch whose steps are profiled: the first with the backbone trained, if any."""
    return max(1, min(settings.model.freeze_epochs + 1, settings.train.epochs))


def run_profile(
    settings: Settings, *, steps: int = 5, out_dir: Path | None = None
) -> ProfileResult:
    """Profile `steps` training steps of the run the settings describe; write the files (and
    log them to MLflow, tag kind=profile, when tracking is on)."""
    if steps < 1:
        raise CtscanError(f"--steps is {steps}; it must be 1 or more.", "pass --steps 5, say.")
    rt, store = runtime_and_store(settings)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    default = settings.paths.runs_dir / f"profile-{settings.model.name}-{stamp}"
    out_dir = ensure_dir(out_dir or default, what="profile folder")
    with folder_lock(out_dir, what="profile folder"):
        atomic_write(out_dir / SETTINGS_FILE, to_toml(settings).encode())
        runs_dir = settings.paths.runs_dir
        with open_tracker(settings.tracking, runs_dir=runs_dir, run_name=out_dir.name) as tracker:
            summary = _profile_run(settings, rt, store, steps, out_dir)
            summary["mlflow_run_id"], torch_version = tracker.run_id, summary["torch_version"]
            atomic_write(out_dir / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
            tracker.log_params(flatten(settings))
            tags = {"kind": "profile", "model": settings.model.name, "device": str(rt.device)}
            tracker.set_tags(tags | {"precision": rt.precision, "torch_version": torch_version})
            tracker.log_metrics(summary_metrics(summary), step=0)
            for name in (SUMMARY_FILE, TOP_OPS_FILE, TRACE_FILE, SETTINGS_FILE):
                tracker.log_artifact(out_dir / name)
            tracker.log_artifact(out_dir / TENSORBOARD_DIR, artifact_path=TENSORBOARD_DIR)
    return ProfileResult(out_dir=out_dir, summary=summary)


def runtime_and_store(settings: Settings) -> tuple[Runtime, Store]:
    """Runtime (one process), threads, seed and the checked store, set as `ctscan train` does."""
    tr = settings.train
    rt = resolve_runtime(tr)
    if rt.distributed:
        raise CtscanError(
            f"ctscan profile runs in one process, but WORLD_SIZE is {rt.world_size}.",
            "run it without torchrun (it profiles one process's steps).",
        )
    if rt.device.type == "cpu":  # kineto logs a GPU-count failure on machines without one
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    configure_threads(tr.threads, rt.world_size)
    seed_everything(tr.seed, tr.deterministic)
    return rt, open_settings_store(settings)


class PreparedRun(NamedTuple):
    """A run built as `ctscan train` builds it: `train_one_epoch`'s positional arguments."""

    state: TrainState
    loop: Loop
    images: torch.Tensor  # (N, 1, S, S) uint8 train split on the device
    labels: torch.Tensor  # (N,) int64


def prepare_run(settings: Settings, rt: Runtime, store: Store) -> PreparedRun:
    """The `Loop`, a fresh `TrainState` (wrapped for steps) and the train split on the device."""
    train_split = store.split("train")
    images, labels = train_split.images.to(rt.device), train_split.labels.to(rt.device)
    loop = new_loop(settings, rt, store.spec, len(train_split))
    state = new_train_state(settings, rt, store.spec, loop.steps_per_epoch)
    wrap_for_steps(state, settings, rt)
    return PreparedRun(state, loop, images, labels)


def run_steps(run: PreparedRun, total: int, *, epoch: int, after_step: Callable[[], None]) -> int:
    """`total` steps through `train_one_epoch` (the same epoch again while the split is shorter),
    `after_step` after each; returns the number of `train_one_epoch` passes."""
    done = passes = 0

    def counted() -> None:
        nonlocal done
        done += 1
        after_step()

    with Progress(enabled=False, quiet=True, epochs=1, steps=total) as progress:
        while done < total:
            before = done
            train_one_epoch(
                *run, epoch=epoch, progress=progress, max_steps=total - done, after_step=counted
            )
            passes += 1
            if done == before:
                raise CtscanError(
                    "the train split of the processed store has no batch to profile.",
                    "preprocess a store with training images (ctscan preprocess).",
                )
    return passes


def _profile_run(
    settings: Settings, rt: Runtime, store: Store, steps: int, out_dir: Path
) -> dict[str, Any]:
    """Build the run as `ctscan train` does, profile it, write the trace files; the summary."""
    tr = settings.train
    run = prepare_run(settings, rt, store)
    epoch = profiled_epoch(settings)
    warmup = warmup_steps(rt.device)
    rec = record_steps(run, epoch=epoch, warmup=warmup, active=steps, out_dir=out_dir)
    summary = summarize(rec, rt.device, batch_size=tr.batch_size)
    summary |= {
        "model": settings.model.name,
        "device": str(rt.device),
        "precision": rt.precision,
        "compile": rt.compile,
        "channels_last": rt.channels_last,
        "batch_size": tr.batch_size,
        "image_size": store.spec.image_size,
        "threads": torch.get_num_threads(),
        "epoch": epoch,
        "backbone_frozen": backbone_frozen(settings, epoch),
        "epoch_passes": rec.passes,
        "schedule": {"wait": WAIT_STEPS, "warmup": warmup, "active": steps},
        "torch_version": str(torch.__version__),
        "ctscan_version": ctscan.__version__,
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "files": {"trace": TRACE_FILE, "tensorboard": TENSORBOARD_DIR, "top_ops": TOP_OPS_FILE},
    }
    summary["memory"].update(profiled_peak_allocated(rec.prof))
    parts = [  # key_averages tables: by self CPU time, and by self CUDA time on CUDA
        f"ctscan profile: {summary['model']} on {summary['device']} ({summary['precision']}), "
        f"batch {tr.batch_size}, {summary['steps_profiled']} steps profiled"
    ]
    averages = rec.prof.key_averages()
    for unit in ("CPU", "CUDA") if rt.device.type == "cuda" else ("CPU",):
        table = averages.table(sort_by=f"self_{unit.lower()}_time_total", row_limit=TOP_N)
        parts += ["", f"Top {TOP_N} by self {unit} time", table]
    atomic_write(out_dir / TOP_OPS_FILE, ("\n".join(parts) + "\n").encode())
    return summary


@dataclass
class Recording:
    """The finished profiler of the active steps and what was measured around it."""

    prof: Any
    passes: int  # train_one_epoch calls it took (more than 1 when the split is short)
    first_step_rss_growth_mb: float  # peak RSS growth over the first (unrecorded) step


def record_steps(
    run: PreparedRun, *, epoch: int, warmup: int, active: int, out_dir: Path
) -> Recording:
    """Run wait + warmup + active steps under the profiler, recording the active ones; the
    tensorboard handler's trace (it can be saved once) is copied to `out_dir/trace.json.gz`."""
    rt = run.loop.rt
    cuda = rt.device.type == "cuda"
    tb_dir = out_dir / TENSORBOARD_DIR
    tb_dir.mkdir(exist_ok=True)
    for old in tb_dir.glob(TB_TRACE_GLOB):  # an earlier profile into the same folder
        old.unlink()

    rss = [max_rss_mb()]

    def after_step() -> None:
        if cuda:  # a step's time is then the GPU's, not only its kernel launches'
            torch.cuda.synchronize(rt.device)
        if len(rss) == 1:  # the wait step: training memory, without the profiler's events
            rss.append(max_rss_mb())
        prof.step()

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.reset_peak_memory_stats(rt.device)
    with profile(
        activities=activities,
        schedule=schedule(wait=WAIT_STEPS, warmup=warmup, active=active, repeat=1),
        on_trace_ready=tensorboard_trace_handler(str(tb_dir), use_gzip=True),
        record_shapes=True,
        profile_memory=True,
        with_stack=False,
    ) as prof:
        total = WAIT_STEPS + warmup + active
        passes = run_steps(run, total, epoch=epoch, after_step=after_step)
    written = sorted(tb_dir.glob(TB_TRACE_GLOB))
    if len(written) != 1:
        raise RuntimeError(f"the profiler wrote {len(written)} traces into {tb_dir}, not 1")
    shutil.copyfile(written[0], out_dir / TRACE_FILE)
    return Recording(prof, passes, max(0.0, rss[1] - rss[0]))


def max_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _ms(us: float) -> float:
    return round(us / 1000.0, 4)


def summarize(rec: Recording, device: torch.device, *, batch_size: int) -> dict[str, Any]:
    """Step times, range totals, the input vs model split, top operators and peak memory."""
    prof = rec.prof
    step_us = [e.time_range.elapsed_us() for e in prof.events() if e.name.startswith(STEP_EVENT)]
    averages = prof.key_averages()
    by_name = {e.key: e for e in averages if e.device_type == DeviceType.CPU}
    range_us = {
        name: float(getattr(by_name.get(name), "cpu_time_total", 0)) for name in LOOP_RANGES
    }
    step_total = float(sum(step_us))
    input_fraction, model_fraction = (
        sum(range_us[n] for n in names) / step_total if step_total else 0.0
        for names in (INPUT_RANGES, MODEL_RANGES)
    )
    median_ms = statistics.median(step_us) / 1000.0 if step_us else 0.0
    cuda = device.type == "cuda"
    ops = sorted(
        (e for e in averages if e.key not in LOOP_RANGES and not e.key.startswith(STEP_EVENT)),
        key=lambda e: e.self_cpu_time_total,
        reverse=True,
    )[:TOP_N]
    cuda_mb = round(torch.cuda.max_memory_allocated(device) / MB, 1) if cuda else None
    return {
        "steps_profiled": len(step_us),
        "step_ms": {
            "median": round(median_ms, 3),
            "min": _ms(min(step_us)) if step_us else 0.0,
            "max": _ms(max(step_us)) if step_us else 0.0,
            "all": [_ms(us) for us in step_us],
        },
        "images_per_s": round(batch_size / (median_ms / 1000.0), 2) if median_ms else 0.0,
        "ranges_ms": {name: _ms(us) for name, us in range_us.items()},
        "steps_total_ms": _ms(step_total),
        "split": {
            "data_augment": round(input_fraction, 4),
            "model": round(model_fraction, 4),
            "other": round(max(0.0, 1.0 - input_fraction - model_fraction), 4),
            "basis": "host wall time of the loop's record_function ranges / step time",
        },
        "memory": {
            "cpu_max_rss_mb": round(max_rss_mb(), 1),
            "cpu_first_step_rss_growth_mb": round(rec.first_step_rss_growth_mb, 1),
            "cuda_max_allocated_mb": cuda_mb,
        },
        "top_ops": [
            {
                "name": e.key,
                "calls": int(e.count),
                "self_cpu_ms": _ms(e.self_cpu_time_total),
                "cpu_total_ms": _ms(e.cpu_time_total),
                "self_cuda_ms": _ms(e.self_device_time_total) if cuda else None,
                "cpu_memory_mb": round(e.self_cpu_memory_usage / MB, 3),
                "cuda_memory_mb": round(e.self_device_memory_usage / MB, 3) if cuda else None,
            }
            for e in ops
        ],
    }


def profiled_peak_allocated(prof: Any) -> dict[str, float | None]:
    """Peak tensor memory allocated during the recorded steps, per device (MiB): the running sum
    of the profiler's `[memory]` events (the trace's "Total Allocated")."""
    records = sorted(
        (e.start_ns(), e.nbytes(), e.device_type())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    peaks = {}
    for name, device in (("cpu", DeviceType.CPU), ("cuda", DeviceType.CUDA)):
        sizes = [nbytes for _, nbytes, on in records if on == device]
        peak = round(max(accumulate(sizes, initial=0)) / MB, 3) if sizes else None
        peaks[f"{name}_profiled_peak_allocated_mb"] = peak
    return peaks


def summary_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The summary's numbers as flat MLflow metrics."""
    split, memory = summary["split"], summary["memory"]
    metrics = {f"{part}_fraction": split[part] for part in ("data_augment", "model", "other")}
    metrics |= {f"{name}_ms": ms for name, ms in summary["ranges_ms"].items()}
    metrics |= {key: float(value) for key, value in memory.items() if value is not None}
    return metrics | {
        "step_ms_median": summary["step_ms"]["median"],
        "images_per_s": summary["images_per_s"],
        "steps_profiled": float(summary["steps_profiled"]),
    }


def split_line(summary: dict[str, Any]) -> str:
    """One line: where the step time goes (data + augment vs model vs other)."""
    split = summary["split"]
    return (
        f"step {summary['step_ms']['median']:.1f} ms (median of {summary['steps_profiled']}): "
        f"data + augment {split['data_augment']:.1%}, model (forward + backward + optimizer) "
        f"{split['model']:.1%}, other {split['other']:.1%}"
    )

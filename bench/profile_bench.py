"""Training step time with and without `ctscan profile`'s profiler, side by side in one run.

On the real processed store (outputs/processed; `ctscan preprocess` builds it), for one model on
the CPU (default efficientnet_lite0, pretrained off, the default settings otherwise). Both arms
build the run as `ctscan profile` does (`prepare_run`: the train loop's `Loop` and `TrainState`)
and run the loop's steps through the same `run_steps` / `train_one_epoch`:

- unprofiled: a timer as `after_step`;
- profiled: `run_profile` itself (CPU activity, record_shapes, profile_memory, the trace files);
  its step times are the "ProfilerStep#" durations.

Each arm skips the first 1 + warmup steps (the profiler's wait + warmup) and times `--steps`
steps; the arms alternate `--rounds` times, each with a fresh model, so that load from other
processes falls on both. Writes bench/results/profile_<device>.json and prints a table.

    python bench/profile_bench.py
    python bench/profile_bench.py --steps 30 --rounds 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ctscan.ops.profile import (
    WAIT_STEPS,
    prepare_run,
    profiled_epoch,
    run_profile,
    run_steps,
    runtime_and_store,
    warmup_steps,
)
from ctscan.settings import Settings, load_settings


def unprofiled_step_ms(settings: Settings, steps: int) -> list[float]:
    """Milliseconds of `steps` training steps without the profiler, after the same skipped ones."""
    rt, store = runtime_and_store(settings)
    run = prepare_run(settings, rt, store)
    skip = WAIT_STEPS + warmup_steps(rt.device)
    ticks: list[float] = []

    def tick() -> None:
        if rt.device.type == "cuda":  # as the profiled arm does
            torch.cuda.synchronize(rt.device)
        ticks.append(time.perf_counter())

    run_steps(run, skip + steps, epoch=profiled_epoch(settings), after_step=tick)
    return [(b - a) * 1000.0 for a, b in zip(ticks[skip - 1 : -1], ticks[skip:], strict=True)]


def profiled(settings: Settings, steps: int, out_dir: Path) -> dict[str, Any]:
    """`run_profile`'s summary, plus the size of the trace it wrote."""
    summary = run_profile(settings, steps=steps, out_dir=out_dir).summary
    summary["trace_bytes"] = (out_dir / summary["files"]["trace"]).stat().st_size
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=1, help="unprofiled/profiled pairs")
    parser.add_argument("--threads", type=int, default=0, help="0: all cores")
    parser.add_argument("--processed-dir", type=Path, default=Path("outputs/processed"))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (args.processed_dir / "meta.json").is_file():
        print(
            f"no processed store in '{args.processed_dir}': run `ctscan preprocess` first.",
            file=sys.stderr,
        )
        return 2
    out = args.out or Path(f"bench/results/profile_{args.device}.json")
    overrides = [
        f'model.name="{args.model}"',
        "model.pretrained=false",
        f'train.device="{args.device}"',
        f"train.threads={args.threads}",
        f'paths.processed_dir="{args.processed_dir}"',
        "train.quiet=true",
        "tracking.enabled=false",
    ]
    settings = load_settings([], overrides)
    load_before = list(os.getloadavg())
    plain: list[float] = []
    prof: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ctscan-profile-bench-") as tmp:
        for i in range(args.rounds):
            plain += unprofiled_step_ms(settings, args.steps)
            prof.append(profiled(settings, args.steps, Path(tmp) / f"round-{i}"))
    seconds = time.perf_counter() - t0
    prof_ms = [ms for summary in prof for ms in summary["step_ms"]["all"]]
    last = prof[-1]
    plain_median, prof_median = statistics.median(plain), statistics.median(prof_ms)
    result = {
        "model": args.model,
        "pretrained": False,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "batch_size": settings.train.batch_size,
        "image_size": last["image_size"],
        "precision": last["precision"],
        "channels_last": last["channels_last"],
        "augment": settings.augment.enabled,
        "steps_per_arm": len(plain),
        "rounds": args.rounds,
        "skipped_steps_per_round": last["schedule"]["wait"] + last["schedule"]["warmup"],
        "unprofiled_step_ms": {"median": plain_median, "all": plain},
        "profiled_step_ms": {"median": prof_median, "all": prof_ms},
        "overhead_ratio": prof_median / plain_median,
        "split": [s["split"] for s in prof],
        "ranges_ms_per_step": {
            name: ms / last["steps_profiled"] for name, ms in last["ranges_ms"].items()
        },
        "top_ops": last["top_ops"][:5],
        "memory": last["memory"],
        "trace_bytes": last["trace_bytes"],
        "seconds": seconds,
        "load_average_before": load_before,
        "load_average_after": list(os.getloadavg()),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "machine": platform.machine(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    split = last["split"]
    batch = settings.train.batch_size
    rows = [
        ("arm", "steps", "median ms", "images/s"),
        ("unprofiled", len(plain), f"{plain_median:.1f}", f"{batch * 1000 / plain_median:.1f}"),
        ("profiled", len(prof_ms), f"{prof_median:.1f}", f"{batch * 1000 / prof_median:.1f}"),
    ]
    print(
        f"{args.model} on {args.device} ({result['threads']} threads, batch {batch}, "
        f"{result['image_size']} px)"
    )
    for row in rows:
        print(f"  {row[0]:<12}{row[1]!s:>7}{row[2]:>11}{row[3]:>10}")
    print(f"  overhead ratio (profiled / unprofiled median): {result['overhead_ratio']:.3f}")
    print(
        f"  profiler split: data + augment {split['data_augment']:.1%}, model "
        f"{split['model']:.1%}, other {split['other']:.1%}"
    )
    print(f"wrote {out} ({seconds:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

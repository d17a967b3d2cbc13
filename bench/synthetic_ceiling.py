"""Training throughput of each registry model on synthetic batches: prints a table, writes JSON.

CPU (default): python bench/synthetic_ceiling.py
GPU:           python bench/synthetic_ceiling.py --device cuda --precision bf16 --channels-last \
                   --compile

Runs are merged into the JSON file, keyed by model and settings, so CPU and GPU results coexist.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ceiling import synthetic_throughput
from ctscan.models import MODEL_NAMES, build_model, input_channels

DEFAULT_MODELS = ("cnn", "resnet18", "efficientnet_lite0", "cnn_gap")
KEY_FIELDS = ("model", "device_name", "precision", "batch", "size", "channels_last", "compile")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = all cores")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "synthetic_ceiling.json"
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {', '.join(MODEL_NAMES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")
    return args


def merge_runs(path: Path, runs: list[dict]) -> list[dict]:
    """Runs already in `path` whose key differs from the new ones, then the new ones."""
    old = json.loads(path.read_text())["runs"] if path.is_file() else []
    new_keys = {tuple(r[k] for k in KEY_FIELDS) for r in runs}
    return [r for r in old if tuple(r.get(k) for k in KEY_FIELDS) not in new_keys] + runs


def main(argv: list[str] | None = None) -> None:
    """Measure every requested model, print a table, merge the results into the JSON file."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if args.device == "cuda":
        torch.backends.cudnn.benchmark = True
    runs = []
    for name in args.models:
        torch.manual_seed(0)
        model = build_model(name, image_size=args.size)
        result = synthetic_throughput(
            model,
            batch=args.batch,
            size=args.size,
            device=args.device,
            precision=args.precision,
            channels_last=args.channels_last,
            compile=args.compile,
            steps=args.steps,
            warmup=args.warmup,
            in_channels=input_channels(name),
        )
        result = {"model": name, **result, "measured_at": datetime.now(UTC).isoformat()}
        runs.append(result)
        print(
            f"{name:>20}  {result['parameters'] / 1e6:7.2f}M  {result['step_ms_median']:9.1f} ms"
            f"  {result['images_per_s']:8.1f} img/s",
            file=sys.stderr,
            flush=True,
        )

    device_name = runs[0]["device_name"] if runs else args.device
    print(
        f"\nsynthetic training ceiling: {device_name}, {args.precision}, batch {args.batch}, "
        f"{args.size} px, channels_last={args.channels_last}, compile={args.compile}, "
        f"threads={torch.get_num_threads()}, median of {args.steps} steps after {args.warmup}"
    )
    print(f"| {'model':<20} | {'params':>8} | {'step ms':>8} | {'img/s':>8} | {'warmup s':>8} |")
    print(f"|{'-' * 22}|{'-' * 10}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for r in runs:
        print(
            f"| {r['model']:<20} | {r['parameters'] / 1e6:7.2f}M | {r['step_ms_median']:8.1f} "
            f"| {r['images_per_s']:8.1f} | {r['warmup_s']:8.1f} |"
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"runs": merge_runs(args.out, runs)}, indent=2) + "\n")
    tmp.replace(args.out)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

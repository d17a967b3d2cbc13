"""Training speed of the pretrained EfficientNet-Lite0 with its first N backbone stages frozen.

`model.frozen_stages = N` keeps the stem and the first N stages at their ImageNet weights for all
of training, so the backward pass stops before them. This times the real loop (`run_training` in
a fresh process, the real store, the main job's settings otherwise) for each N, side by side in
one run, the variants alternating when `--repeats` > 1. The figure is images per second over the
training steps of epochs 2.. (epoch 1 has the whole backbone frozen, `model.freeze_epochs`), with
the seconds per epoch (validation included) beside it.

    python bench/frozen_stages.py --processed-dir outputs/processed --stages 0 2 3 4

Writes bench/results/frozen_stages_cpu.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import REPO, loop_in_subprocess, steady_throughput


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processed-dir", default="outputs/processed")
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--out", default="bench/results/frozen_stages_cpu.json")
    args = ap.parse_args()

    base = [
        f'paths.processed_dir="{Path(args.processed_dir).resolve()}"',
        'train.device="cpu"',
        f"train.epochs={args.epochs}",
        "train.evaluate_test=false",
        "train.calibrate=false",
        f"train.checkpoint_every={args.epochs}",
        "train.quiet=true",
        "tracking.enabled=false",
    ]
    runs: dict[int, list[dict]] = {n: [] for n in args.stages}
    for _ in range(args.repeats):  # alternate, so drift in the machine hits every variant alike
        for n in args.stages:
            history = loop_in_subprocess(REPO / "src", [*base, f"model.frozen_stages={n}"], REPO)
            runs[n].append(
                {
                    "images_per_s": steady_throughput(history),
                    "epoch_seconds": [r["epoch_seconds"] for r in history],
                }
            )
    rows = []
    for n, done in runs.items():
        rate = statistics.median(r["images_per_s"] for r in done)
        seconds = statistics.median(s for r in done for s in r["epoch_seconds"][1:])
        rows.append({"frozen_stages": n, "images_per_s": rate, "epoch_seconds": seconds})
        rows[-1]["runs"] = done
    zero = next((r["images_per_s"] for r in rows if r["frozen_stages"] == 0), None)
    print("| frozen stages | train img/s (epochs 2..) | seconds per epoch | speed-up |")
    print("| --- | --- | --- | --- |")
    for row in rows:
        row["speedup"] = row["images_per_s"] / zero if zero else None
        speedup = f"{row['speedup']:.2f}x" if zero else "-"
        print(
            f"| {row['frozen_stages']} | {row['images_per_s']:.1f} | "
            f"{row['epoch_seconds']:.1f} | {speedup} |"
        )
    report = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": vars(args),
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

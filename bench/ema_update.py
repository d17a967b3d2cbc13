"""Cost of one EMA update of the main job's model: torch's EMA, ctscan's, with and without warm-up.

The training loop updates the weight average after every optimizer step (`train.ema`). This
times `AveragedModel.update_parameters` on EfficientNet-Lite0 (160 px head, buffers included)
with torch's `get_ema_multi_avg_fn` and with `ctscan.engine.state.ema_update` (warm-up on and
off), the variants alternating over `--rounds`, one thread. Median milliseconds per update.

    python bench/ema_update.py --rounds 7 --updates 50

Writes bench/results/ema_update_cpu.json and prints the medians.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ctscan.engine.modelling import build
from ctscan.engine.state import ema_update
from ctscan.settings import load_settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--updates", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ema_update_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    settings = load_settings([], ["model.pretrained=false"])
    model = build(settings, image_size=160, num_classes=4)
    variants = {
        "torch get_ema_multi_avg_fn(0.99)": get_ema_multi_avg_fn(0.99),
        "ctscan ema_update(0.99, warmup=False)": ema_update(0.99, warmup=False),
        "ctscan ema_update(0.99, warmup=True)": ema_update(0.99, warmup=True),
    }
    averages = {
        name: AveragedModel(model, multi_avg_fn=fn, use_buffers=True)
        for name, fn in variants.items()
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, average in averages.items():
            t0 = time.perf_counter()
            for _ in range(args.updates):
                average.update_parameters(model)
            times[name].append((time.perf_counter() - t0) / args.updates * 1e3)
    result = {
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": args.rounds,
        "updates": args.updates,
        "median_ms_per_update": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "ms_per_round": {k: [round(x, 3) for x in v] for k, v in times.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    for name, ms in result["median_ms_per_update"].items():
        print(f"{name}: {ms} ms per update")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

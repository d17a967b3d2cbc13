"""`ctscan train` throughput on the real store vs the same model's synthetic-batch ceiling.

Both are measured in one process, side by side, per model. The loop's figure is images per
second over the training steps (augmentation included; validation and checkpointing excluded),
over epochs 2.. (epoch 1 holds compilation and warm-up). Writes bench/results/train_<device>.json.

    python bench/train_bench.py --device cpu --models cnn resnet18 efficientnet_lite0
    python bench/train_bench.py --device cuda --precision bf16 --batch 256 --compile on
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ceiling import synthetic_throughput
from ctscan.data.store import load_store
from ctscan.engine.train import run_training
from ctscan.models import build_model, input_channels
from ctscan.settings import load_settings


def steady_throughput(history: list[dict]) -> float:
    """Images per second over the training steps of epochs 2.. (all epochs if only one)."""
    rows = history[1:] or history
    return sum(r["train_images"] for r in rows) / sum(r["train_seconds"] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet18", "efficientnet_lite0"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--compile", default="off", choices=["on", "off"])
    ap.add_argument("--processed-dir", default="outputs/processed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    # As `ctscan train` does (engine.runtime.configure_threads): the ceiling and the loop must
    # both flush denormal floats, else the comparison measures the CPU's denormal penalty.
    torch.set_flush_denormal(True)
    store = load_store(args.processed_dir)
    size = store.spec.image_size
    rows = []
    for name in args.models:
        model = build_model(name, pretrained=False, image_size=size)
        ceiling = synthetic_throughput(
            model,
            batch=args.batch,
            size=size,
            device=args.device,
            precision=args.precision,
            channels_last=True,
            compile=args.compile == "on",
            steps=10 if args.device == "cpu" else 30,
            warmup=2 if args.device == "cpu" else 10,
            in_channels=input_channels(name),
        )
        del model
        with tempfile.TemporaryDirectory() as tmp:
            settings = load_settings(
                [],
                [
                    f'paths.processed_dir="{args.processed_dir}"',
                    f'paths.runs_dir="{tmp}"',
                    f"data.image_size={size}",
                    f'data.on_leak="{store.meta["on_leak"]}"',
                    f'model.name="{name}"',
                    "model.pretrained=false",
                    f'train.device="{args.device}"',
                    f'train.precision="{args.precision}"',
                    f'train.compile="{args.compile}"',
                    f"train.batch_size={args.batch}",
                    f"train.epochs={args.epochs}",
                    "train.evaluate_test=false",
                    f"train.checkpoint_every={args.epochs}",
                    "train.quiet=true",
                    "tracking.enabled=false",
                ],
            )
            result = run_training(settings, out_dir=Path(tmp) / "run")
        loop = steady_throughput(result.history)
        rows.append(
            {
                "model": name,
                "ceiling_images_per_s": ceiling["images_per_s"],
                "train_images_per_s": loop,
                "ratio": loop / ceiling["images_per_s"],
                "epochs": args.epochs,
                "per_epoch_images_per_s": [r["train_images_per_s"] for r in result.history],
                "ceiling": ceiling,
            }
        )
        print(
            f"{name:>20}  ceiling {ceiling['images_per_s']:9.1f} img/s   "
            f"ctscan train {loop:9.1f} img/s   ratio {loop / ceiling['images_per_s']:.3f}",
            flush=True,
        )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor()
    report = {
        "machine": {
            "device": args.device,
            "device_name": device_name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "settings": vars(args),
        "image_size": size,
        "rows": rows,
    }
    out = Path(args.out or f"bench/results/train_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

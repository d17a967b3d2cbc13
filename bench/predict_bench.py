"""`ctscan predict` throughput over a folder of images, per model file, side by side.

Two figures per model file (a checkpoint runs on torch, an .onnx file on ONNX Runtime):

- `cli`: the wall time of `ctscan predict DIR --model FILE --json` in a fresh process, start-up,
  model load, decode and JSON output included (what a user waits for);
- `steady`: `Predictor.predict_files` over the same files in this process, after one warm-up
  pass (decode, resize, batching and the model; no start-up), images/s; also with decoding in
  the calling thread (`inference.decode_threads=1`, `steady_serial`), the way it was before
  files were decoded ahead in threads.

The files are timed in turn, repeat by repeat, so that a change of load on the machine hits them
alike; medians over `--repeats`. Threads: `train.threads` (ctscan's own default) for both.

    ctscan export outputs/runs/x/best.pt --int8
    python bench/predict_bench.py outputs/runs/x/best.pt outputs/runs/x/best.onnx \
        outputs/runs/x/best.int8.onnx --images data/chest-ctscan-images/test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ctscan.inference import open_predictor
from ctscan.inference.batch import collect_inputs
from ctscan.settings import load_settings


def cli_seconds(model: Path, images: Path, cli_args: list[str]) -> tuple[float, int]:
    """Wall seconds of one `ctscan predict --json` and the number of JSON lines it printed."""
    cmd = [sys.executable, "-m", "ctscan", "predict", str(images), "--model", str(model)]
    start = time.perf_counter()
    done = subprocess.run([*cmd, "--json", *cli_args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    return seconds, len([line for line in done.stdout.splitlines() if line.strip()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="checkpoint (.pt) and/or .onnx files")
    ap.add_argument("--images", type=Path, default=Path("data/chest-ctscan-images/test"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("-s", "--settings", action="append", default=[], help="settings file")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="k=v")
    ap.add_argument("--out", type=Path, default=Path("bench/results/predict_cpu.json"))
    args = ap.parse_args()

    settings = load_settings(args.settings, args.overrides)
    cli_args = [a for s in args.settings for a in ("-s", s)]
    cli_args += [a for o in args.overrides for a in ("--set", o)]
    paths = collect_inputs([args.images])
    import torch

    torch.set_num_threads(int(settings.train.threads or os.cpu_count() or 1))
    torch.set_flush_denormal(True)  # as ctscan's runtime does
    predictors = {m: open_predictor(m, settings=settings) for m in args.models}
    for predictor in predictors.values():
        predictor.predict_files(paths)  # warm-up: first calls, allocator, file cache

    cli: dict[Path, list[float]] = {m: [] for m in args.models}
    steady: dict[Path, list[float]] = {m: [] for m in args.models}
    serial: dict[Path, list[float]] = {m: [] for m in args.models}
    for _ in range(args.repeats):
        for model, predictor in predictors.items():
            seconds, lines = cli_seconds(model, args.images, cli_args)
            if lines != len(paths):
                raise SystemExit(f"{model}: {lines} JSON lines for {len(paths)} images")
            cli[model].append(len(paths) / seconds)
            for threads, figures in ((settings.inference.decode_threads, steady), (1, serial)):
                predictor.decode_threads = threads
                start = time.perf_counter()
                predictions = predictor.predict_files(paths)
                figures[model].append(len(paths) / (time.perf_counter() - start))
                assert not any(p.error for p in predictions), "a test image failed to decode"

    rows = []
    for model, predictor in predictors.items():
        row = {
            "model": str(model),
            "format": predictor.info.format,
            "backend": predictor.info.backend,
            "images": len(paths),
            "batch_size": predictor.batch_size,
            "cli_images_per_s": statistics.median(cli[model]),
            "cli_runs_images_per_s": cli[model],
            "steady_images_per_s": statistics.median(steady[model]),
            "steady_runs_images_per_s": steady[model],
            "decode_threads": settings.inference.decode_threads or min(4, os.cpu_count() or 1),
            "steady_serial_images_per_s": statistics.median(serial[model]),
            "steady_serial_runs_images_per_s": serial[model],
        }
        rows.append(row)
        print(
            f"{model.name:>20}  {row['backend']:>5}  ctscan predict {row['cli_images_per_s']:7.1f}"
            f" img/s (start-up included)   steady {row['steady_images_per_s']:7.1f} img/s"
            f" (decoding in the calling thread {row['steady_serial_images_per_s']:7.1f})"
        )
    result = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "load_avg_1m_at_end": os.getloadavg()[0],
        },
        "settings": {**vars(args), "models": [str(m) for m in args.models]},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""`ctscan predict` as a whole command (start-up included) per model file, side by side.

Each run is `ctscan predict DIR --model FILE --json` in a fresh process: its wall seconds and its
CPU seconds (user + system, all threads), images/s = files / wall. A checkpoint runs twice: on
`--backend torch` and on `--backend auto` (its cached ONNX export, made by one untimed run
first); an .onnx file (fp32 or int8) on ONNX Runtime (and with `--openvino` on OpenVINO). The
runs take turns, repeat by repeat, so that a change of load hits them alike; medians over
`--repeats`. The JSON names the CPU and
its flags (figures from AVX2 and AVX-512 + VNNI CPUs go in separate columns).

    ctscan export outputs/runs/x/best.pt --int8
    python bench/predict_bench.py outputs/runs/x/best.pt outputs/runs/x/best.onnx \
        outputs/runs/x/best.int8.onnx --images data/chest-ctscan-images/test --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import write_result


def run_predict(model: Path, backend: str, images: Path, extra: list[str]) -> dict[str, float]:
    """One `ctscan predict --json`: wall and CPU seconds, and the rows it printed."""
    cmd = [sys.executable, "-m", "ctscan", "predict", str(images), "--model", str(model), "--json"]
    cmd += ["--backend", backend, *extra]
    before = os.times()
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return {"wall_s": wall, "cpu_s": cpu, "rows": len(rows), "ran_on": rows[0]["model"]["backend"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="+", type=Path, help="checkpoint (.pt) and/or .onnx files")
    ap.add_argument("--images", type=Path, default=Path("data/chest-ctscan-images/test"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("-s", "--settings", action="append", default=[], help="settings file")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="k=v")
    ap.add_argument(
        "--openvino", action="store_true", help="each .onnx file on --backend openvino too"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/results/predict_cpu.json"))
    args = ap.parse_args()

    extra = [a for s in args.settings for a in ("-s", s)]
    extra += [a for o in args.overrides for a in ("--set", o)]
    cases = [
        (model, backend)
        for model in args.models
        for backend in (
            ("torch", "auto")
            if model.suffix.lower() == ".pt"
            else ("auto", "openvino")
            if args.openvino
            else ("auto",)
        )
    ]
    for model, backend in cases:  # warm-up: the file cache, a checkpoint's ONNX export
        run_predict(model, backend, args.images, extra)
    runs: dict[tuple[Path, str], list[dict[str, float]]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for model, backend in cases:
            runs[model, backend].append(run_predict(model, backend, args.images, extra))

    rows = []
    for (model, backend), figures in runs.items():
        wall = statistics.median(f["wall_s"] for f in figures)
        row = {
            "model": str(model),
            "backend_flag": backend,
            "ran_on": figures[0]["ran_on"],
            "images": figures[0]["rows"],
            "images_per_s": figures[0]["rows"] / wall,
            "wall_s": wall,
            "cpu_s": statistics.median(f["cpu_s"] for f in figures),
            "runs": figures,
        }
        rows.append(row)
        print(
            f"{model.name:>24}  --backend {backend:<8} ({row['ran_on']:>8})  "
            f"{row['images_per_s']:7.1f} img/s  {wall:6.2f} s wall  {row['cpu_s']:6.2f} CPU s"
        )
    write_result(args, rows)


if __name__ == "__main__":
    main()

"""`ctscan predict` as a whole command (start-up included) per model file, side by side.

Each run is `ctscan predict DIR --model FILE --json` in a fresh process: its wall seconds and its
CPU seconds (user + system, all threads), images/s = files / wall. A checkpoint runs twice: on
`--backend torch` and on `--backend auto` (its cached ONNX export, made by one untimed run
first); an .onnx file (fp32 or int8) on ONNX Runtime (and with `--openvino` on OpenVINO). The
runs take turns, repeat by repeat, so that a change of load hits them alike; medians over
`--repeats`. The JSON names the CPU and
its flags (figures from AVX2 and AVX-512 + VNNI CPUs go in separate columns).

`--budget` adds where a whole command's time goes, per model file and backend: the interpreter
(`python -c pass`), then in one fresh process the imports the console script makes, settings and
opening the model (CPU and wall), each test image read alone in one thread (decode and resize, CPU
ms from the stage timers predict itself runs) and the model over them in `inference.batch_size`
batches (CPU ms per image, all threads). The bound it prints is the best a whole command could do
on this machine: start-up + images x (decode + resize + model CPU) / cores.

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


BUDGET = r"""
import json, sys, time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
w0, c0 = time.perf_counter(), time.process_time()
import ctscan.cli  # what the console script imports before any work
from ctscan.inference.batch import collect_inputs
from ctscan.ops.backends import open_model
w1, c1 = time.perf_counter(), time.process_time()
model, backend, images, *extra = sys.argv[1:]
predictor = open_model(model, ctscan.cli._settings(None, extra), backend)
w2, c2 = time.perf_counter(), time.process_time()
cpu = defaultdict(float)
@contextmanager
def stage(name):
    t = time.thread_time()
    yield
    cpu[name] += time.thread_time() - t
files = collect_inputs([Path(images)])
decoded = [predictor.read(f, stage=stage) for f in files]
c3, size = time.process_time(), predictor.batch_size
for i in range(0, len(decoded), size):
    predictor.logits(__import__("numpy").stack(decoded[i : i + size])[:, None])
n = len(files)
print(json.dumps({"import": {"cpu_s": c1 - c0, "wall_s": w1 - w0},
    "open": {"cpu_s": c2 - c1, "wall_s": w2 - w1}, "images": n, "batch_size": size,
    "decode_ms": 1e3 * cpu["decode"] / n, "resize_ms": 1e3 * cpu["resize"] / n,
    "model_ms": 1e3 * (time.process_time() - c3) / n}))
"""


def budget(model: Path, backend: str, images: Path, overrides: list[str]) -> dict[str, float]:
    """Where a whole `ctscan predict` goes (BUDGET above, in a fresh process) and its bound."""
    cmd = [sys.executable, "-c", BUDGET, str(model), backend, str(images), *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    figures = json.loads(done.stdout.splitlines()[-1])
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    figures["interpreter_wall_s"] = time.perf_counter() - start
    per_image = figures["decode_ms"] + figures["resize_ms"] + figures["model_ms"]
    start_up = figures["interpreter_wall_s"] + figures["import"]["wall_s"]
    start_up += figures["open"]["wall_s"]
    wall = start_up + figures["images"] * per_image / 1e3 / (os.cpu_count() or 1)
    return {
        **figures,
        "start_up_s": start_up,
        "bound_s": wall,
        "bound_images_per_s": figures["images"] / wall,
    }


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
    ap.add_argument("--budget", action="store_true", help="add where the time goes (see above)")
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
        if args.budget:
            row["budget"] = budget(model, backend, args.images, args.overrides)
            b = row["budget"]
            print(
                f"{'':>24}  budget: start-up {b['start_up_s']:.2f} s (interpreter "
                f"{b['interpreter_wall_s']:.2f}, imports {b['import']['wall_s']:.2f}, open "
                f"{b['open']['wall_s']:.2f}); per image CPU ms: decode {b['decode_ms']:.2f}, "
                f"resize {b['resize_ms']:.2f}, model {b['model_ms']:.2f}; bound "
                f"{b['bound_s']:.2f} s = {b['bound_images_per_s']:.0f} img/s"
            )
        rows.append(row)
        print(
            f"{model.name:>24}  --backend {backend:<8} ({row['ran_on']:>8})  "
            f"{row['images_per_s']:7.1f} img/s  {wall:6.2f} s wall  {row['cpu_s']:6.2f} CPU s"
        )
    write_result(args, rows)


if __name__ == "__main__":
    main()

"""`ctscan train` throughput on the real store vs the same model's synthetic-batch ceiling.

Both are measured in one run, side by side, per model. The loop's figure is images per
second over the training steps (augmentation included; validation and checkpointing excluded),
over epochs 2.. (epoch 1 holds compilation and warm-up). Writes bench/results/train_<device>.json.

With `--baseline REV` the loop of another git revision (checked out in a temporary worktree,
its own store written by its own `ctscan preprocess`) is timed in the same run, each loop in a
fresh subprocess, alternating, and the function sizes of both `engine/train.py` are listed.

    python bench/train_bench.py --device cpu --models cnn resnet18 efficientnet_lite0
    python bench/train_bench.py --device cpu --baseline f811052 --processed-dir outputs/processed
    python bench/train_bench.py --device cuda --precision bf16 --batch 256 --compile on
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _ceiling import synthetic_throughput
from ctscan.data.store import load_store
from ctscan.models import build_model, input_channels


def steady_throughput(history: list[dict]) -> float:
    """Images per second over the training steps of epochs 2.. (all epochs if only one)."""
    rows = history[1:] or history
    return sum(r["train_images"] for r in rows) / sum(r["train_seconds"] for r in rows)


REPO = Path(__file__).resolve().parents[1]
# Runs `run_training` of whatever ctscan is on PYTHONPATH and prints its history as JSON.
_LOOP = """
import json, sys, tempfile
from pathlib import Path
import torch
torch.set_flush_denormal(True)
from ctscan.engine.train import run_training
from ctscan.settings import load_settings
with tempfile.TemporaryDirectory() as tmp:
    settings = load_settings([], json.loads(sys.argv[1]) + [f'paths.runs_dir="{tmp}"'])
    result = run_training(settings, out_dir=Path(tmp) / "run")
print("HISTORY" + json.dumps(result.history))
"""


def loop_in_subprocess(src: Path, overrides: list[str], cwd: Path) -> list[dict]:
    """The history of one `run_training` of the ctscan in `src`, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    env = {k: v for k, v in env.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    proc = subprocess.run(
        [sys.executable, "-c", _LOOP, json.dumps(overrides)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"loop of {src} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("HISTORY"))
    return json.loads(line[len("HISTORY") :])


def function_sizes(path: Path) -> dict[str, dict[str, int]]:
    """Lines and parameters of every function in a module (the loop's shape, before/after)."""
    tree = ast.parse(path.read_text())
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            a = node.args
            params = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            out[node.name] = {"lines": node.end_lineno - node.lineno + 1, "params": params}
    return out


def baseline_tree(rev: str, where: Path, raw_dir: Path, size: int) -> tuple[Path, Path]:
    """A worktree of `rev` and a store written by its own preprocess: (src folder, store)."""
    tree = where / "baseline"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), rev],
        check=True,
        capture_output=True,
    )
    store = where / "baseline-store"
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ctscan",
            "preprocess",
            str(raw_dir),
            "--out",
            str(store),
            "--set",
            f"data.image_size={size}",
            "--quiet",
        ],
        check=True,
        capture_output=True,
        env=env,
        cwd=tree,
    )
    return tree / "src", store


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
    ap.add_argument("--baseline", default=None, help="git revision to time beside this tree")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each loop (median)")
    ap.add_argument("--raw-dir", default="data/chest-ctscan-images")
    args = ap.parse_args()

    # As `ctscan train` does (engine.runtime.configure_threads): the ceiling and the loop must
    # both flush denormal floats, else the comparison measures the CPU's denormal penalty.
    torch.set_flush_denormal(True)
    store = load_store(args.processed_dir)
    workdir = Path(tempfile.mkdtemp(prefix="train-bench-"))
    baseline = None
    if args.baseline:
        baseline = baseline_tree(
            args.baseline, workdir, Path(args.raw_dir).resolve(), store.spec.image_size
        )
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
        overrides = [
            f'paths.processed_dir="{Path(args.processed_dir).resolve()}"',
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
        ]
        loops: dict[str, list[float]] = {"current": []}
        histories: dict[str, list[dict]] = {}
        if baseline is not None:
            loops["baseline"] = []
        for _ in range(args.repeats):  # alternate, so drift in the machine hits both alike
            for which in loops:
                if which == "current":
                    history = loop_in_subprocess(REPO / "src", overrides, REPO)
                else:
                    base_src, base_store = baseline
                    base_overrides = [
                        f'paths.processed_dir="{base_store}"' if o.startswith("paths.") else o
                        for o in overrides
                    ]
                    history = loop_in_subprocess(base_src, base_overrides, base_src.parent)
                loops[which].append(steady_throughput(history))
                histories[which] = history
        ceiling_ips = ceiling["images_per_s"]
        row = {"model": name, "ceiling_images_per_s": ceiling_ips, "epochs": args.epochs}
        for which, values in loops.items():
            loop = statistics.median(values)
            key = "train" if which == "current" else "baseline"
            row[f"{key}_images_per_s"] = loop
            row[f"{key}_ratio"] = loop / ceiling_ips
            row[f"{key}_runs_images_per_s"] = values
            row[f"{key}_per_epoch_images_per_s"] = [
                r["train_images_per_s"] for r in histories[which]
            ]
        row["ratio"] = row["train_ratio"]
        row["ceiling"] = ceiling
        rows.append(row)
        line = (
            f"{name:>20}  ceiling {ceiling_ips:8.1f} img/s   ctscan train "
            f"{row['train_images_per_s']:8.1f} img/s  ratio {row['train_ratio']:.3f}"
        )
        if "baseline" in loops:
            line += (
                f"   baseline {row['baseline_images_per_s']:8.1f} img/s"
                f"  ratio {row['baseline_ratio']:.3f}"
            )
        print(line, flush=True)
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
    if baseline is not None:
        report["baseline"] = {
            "revision": args.baseline,
            "train_py_functions": function_sizes(baseline[0] / "ctscan" / "engine" / "train.py"),
        }
        report["train_py_functions"] = function_sizes(
            REPO / "src" / "ctscan" / "engine" / "train.py"
        )
        subprocess.run(
            ["git", "-C", str(REPO), "worktree", "remove", "--force", str(workdir / "baseline")],
            check=False,
        )
    out = Path(args.out or f"bench/results/train_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

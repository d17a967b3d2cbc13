"""Ensembles and test-time flips beside the single model: test accuracy and latency, one run.

For each configuration the bench builds the ensemble checkpoint with `ctscan.ops.ensemble`
(exactly what `ctscan ensemble` writes), scores it on the store's test split with
`evaluate_checkpoint` (accuracy, macro-F1, ECE, the leak-free subset), exports it to ONNX and
times `Predictor.probabilities` on the eager (torch) and ONNX Runtime backends at batch 1 and 32
(median of `--repeats` calls after 3 warm-up calls, uint8 input, calibrated probabilities out).

Configurations: the single model (`--single`, default the first fold model), the single model
with hflip, vflip and both (`--no-tta` leaves these three out); the K fold models of a `ctscan
train --folds K` folder (`--cv`), and with hflip; the runs of several seeds (`--seeds RUN ...`),
with their members' own temperatures and again with one temperature fitted on top on the
validation split (what `ctscan calibrate ENSEMBLE` does; valid is held out for every seed's
run, unlike for fold models). Model selection never looked at test: the flips to keep are read
off the table, and docs/results.md says which help.

    python bench/ensemble_bench.py --cv outputs/cv-gap/cv5-s0-030517 \\
        --set paths.processed_dir=outputs/processed96 --set data.image_size=96
    python bench/ensemble_bench.py --single RUN/best.pt --out bench/results/tta_main_cpu.json
    python bench/ensemble_bench.py --single S0 --seeds S0 S1 S2 --no-tta \
        --out bench/results/seed_ensemble_main_cpu.json
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

import numpy as np

from ctscan.data.store import open_store
from ctscan.engine.checkpoint import read_checkpoint
from ctscan.engine.evaluate import evaluate_checkpoint
from ctscan.engine.runtime import resolve_runtime
from ctscan.errors import CtscanError
from ctscan.inference.predictor import open_predictor
from ctscan.ops.ensemble import build_ensemble, member_paths
from ctscan.ops.export import export_metadata, write_onnx
from ctscan.settings import load_settings


def latency_ms(predictor: Any, images: np.ndarray, batch: int, repeats: int) -> float:
    x = images[:batch]
    for _ in range(3):
        predictor.probabilities(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        predictor.probabilities(x)
        times.append((time.perf_counter() - start) * 1000)
    return round(statistics.median(times), 2)


def build(
    name: str, members: list[Path], flips: tuple[str, ...], settings: Any, folder: Path
) -> tuple[Path, float]:
    """The configuration's checkpoint (every member read and checked) and the seconds it took."""
    target = folder / name / "model.pt"
    start = time.perf_counter()
    build_ensemble(settings, members, out=target, flips=flips)
    return target, time.perf_counter() - start


def measure(
    name: str,
    members: list[Path],
    flips: tuple[str, ...],
    settings: Any,
    built: tuple[Path, float],
    args: Any,
    calibrate: bool = False,
) -> dict[str, Any]:
    from ctscan.engine.calibration import fit_checkpoint
    from ctscan.engine.checkpoint import load_model, save_checkpoint

    target, built_s = built
    ckpt = read_checkpoint(target)
    store = open_store(settings.paths.processed_dir, expect_data=None)
    if calibrate:  # one temperature on top of the members' own, fitted on valid
        ckpt, _ = fit_checkpoint(ckpt, store, resolve_runtime(settings.train))
        save_checkpoint(target, ckpt)
    report = evaluate_checkpoint(
        ckpt, store=store, split="test", rt=resolve_runtime(settings.train), out_dir=None
    )
    onnx = target.with_suffix(".onnx")
    meta = export_metadata(ckpt, checkpoint_sha256="bench", fmt="onnx")
    write_onnx(load_model(ckpt).deployable(), onnx, size=ckpt.spec.image_size, meta=meta)
    images = store.split("test").images[:32].cpu().numpy()  # (32, 1, S, S) uint8
    row: dict[str, Any] = {
        "name": name,
        "members": len(members),
        "flips": list(flips),
        "model_calls_per_image": len(members) * (1 + len(flips)),
        "build_s": round(built_s, 1),
        "temperature_on_top": ckpt.temperature,
        "test": {
            "n": report["n"],
            "accuracy": report["accuracy"],
            "macro_f1": report["macro_f1"],
            "ece": report["ece"],
            "ece_floor": report["ece_floor"],
            "leak_free_accuracy": report["leak_free"]["accuracy"],
            "leak_free_macro_f1": report["leak_free"]["macro_f1"],
        },
        "latency_ms": {},
    }
    for backend, model in (("torch", target), ("onnx", onnx)):
        predictor = open_predictor(model, settings=settings, backend=backend)
        for batch in (1, 32):
            row["latency_ms"][f"{backend}_b{batch}"] = latency_ms(
                predictor, images, batch, args.repeats
            )
    print(
        f"{name:<22} acc {row['test']['accuracy']:.4f} leak-free "
        f"{row['test']['leak_free_accuracy']:.4f} ECE {row['test']['ece']:.3f}  "
        + "  ".join(f"{k} {v} ms" for k, v in row["latency_ms"].items()),
        flush=True,
    )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cv", type=Path, help="a `ctscan train --folds K` folder")
    ap.add_argument("--single", type=Path, help="the single model (default: the first fold's)")
    ap.add_argument("--seeds", type=Path, nargs="+", default=[], help="runs of several seeds")
    ap.add_argument(
        "--tta", action=argparse.BooleanOptionalAction, default=True, help="the flip rows"
    )
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("-s", "--settings", action="append", default=[], help="settings file")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="k=v")
    ap.add_argument("--out", type=Path, default=Path("bench/results/ensemble_cpu.json"))
    args = ap.parse_args()
    if args.cv is None and args.single is None:
        ap.error("give --cv, --single or both (--seeds compares with --single)")
    try:
        settings = load_settings(args.settings, [*args.overrides, "tracking.enabled=false"])
        rows, single, seeds = run(args, settings)
    except CtscanError as exc:  # a bad member or folder: one line, nothing measured or written
        print(f"ensemble_bench: error: {exc.message} Fix: {exc.fix}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    report = {
        "bench": "ensemble",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before_last": list(os.getloadavg()),
        },
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "single": str(single),
        "cv": str(args.cv) if args.cv else None,
        "seeds": [str(p) for p in seeds],
        "store": str(settings.paths.processed_dir),
        "threads": int(settings.train.threads),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")


def run(args: Any, settings: Any) -> tuple[list[dict[str, Any]], Path, list[Path]]:
    """Build every configuration first (a bad member stops the bench before any timing)."""
    folds = member_paths([args.cv]) if args.cv is not None else []
    seeds = member_paths(args.seeds) if args.seeds else []
    single = member_paths([args.single])[0] if args.single is not None else folds[0]
    configs: list[tuple[str, list[Path], tuple[str, ...], bool]] = [("single", [single], (), False)]
    if args.tta:
        configs += [
            ("single+hflip", [single], ("hflip",), False),
            ("single+vflip", [single], ("vflip",), False),
            ("single+hflip+vflip", [single], ("hflip", "vflip"), False),
        ]
    if folds:
        configs += [
            (f"{len(folds)}-fold", folds, (), False),
            (f"{len(folds)}-fold+hflip", folds, ("hflip",), False),
        ]
    if seeds:
        configs += [
            (f"{len(seeds)}-seed", seeds, (), False),
            (f"{len(seeds)}-seed, T on valid", seeds, (), True),
        ]
    with tempfile.TemporaryDirectory(prefix="ctscan-ens-") as tmp:
        built = [build(n, m, f, settings, Path(tmp)) for n, m, f, _ in configs]
        rows = [
            measure(n, m, f, settings, b, args, c)
            for (n, m, f, c), b in zip(configs, built, strict=True)
        ]
    return rows, single, seeds


if __name__ == "__main__":
    main()

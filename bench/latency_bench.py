"""CPU inference latency: torch eager vs ONNX Runtime fp32 vs static int8, side by side.

Per model (random weights at 224 px: latency does not depend on the weights), the files are made
by the functions `ctscan export` uses (`write_onnx`, `quantize_onnx`: static QDQ, per-channel
int8 weights, uint8 activations), from `LoadedModel.deployable()`: uint8 (B, 1, S, S) in, logits
out, normalisation inside, so all three formats do the same work. Each (model, batch) times the
three formats in turn, call by call, so that a change of load on the machine hits them alike;
median and p99 over `--runs` calls after `--warmup` calls. The JSON is rewritten after every
(model, batch), so an interrupted run keeps what it measured (batch 1 of every model comes
first). Threads: torch.set_num_threads and ONNX Runtime intra_op_num_threads = `--threads`
(inter-op 1).

With `--checkpoint`, that checkpoint is exported by `run_export` (parity on the test split of
the processed store given by -s/--set: the accuracy of each format comes from there) and its
files are timed as well, at its own image size.

Targets (issue #7): ORT fp32 >= 1.8x eager at batch 1, int8 >= 2x ORT fp32.

    python bench/latency_bench.py
    python bench/latency_bench.py --models resnet18 --runs 100 --batches 1
    python bench/latency_bench.py --checkpoint outputs/runs/x/best.pt --set paths.processed_dir=...
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ctscan import CLASS_NAMES
from ctscan.data.transforms import PreprocessSpec
from ctscan.engine.checkpoint import Checkpoint, LoadedModel, load_model
from ctscan.engine.modelling import build_model
from ctscan.ops.export import ExportResult, export_metadata, quantize_onnx, run_export, write_onnx

FORMATS = ("eager", "onnx", "onnx-int8")
TARGET_ORT_VS_EAGER = 1.8  # at batch 1
TARGET_INT8_VS_ORT = 2.0


def export_summary(result: ExportResult) -> dict[str, Any]:
    """`run_export`'s result as JSON: paths and the error as text, the parity rows' names as the
    reports have always had them."""
    names = {"max_abs_diff": "max_abs_logit_diff", "agreement": "argmax_agreement"}
    data = {f.name: getattr(result, f.name) for f in fields(result)}
    data["parity"] = [{names.get(k, k): v for k, v in asdict(r).items()} for r in result.parity]
    return json.loads(json.dumps(data, default=str))


def cpu_name() -> str:
    """The CPU model line of /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def random_model(name: str, size: int) -> LoadedModel:
    """A registry model with random weights, loaded as a checkpoint would be."""
    torch.manual_seed(0)
    spec = PreprocessSpec(
        image_size=size, resize="pad", mean=0.23, std=0.27, class_names=CLASS_NAMES
    )
    net = build_model(name, num_classes=len(CLASS_NAMES), image_size=size, dropout=0.2)
    checkpoint = Checkpoint(
        kind="best", model_name=name, spec=spec, model_state=net.state_dict(), settings={}
    )
    return load_model(checkpoint)


def onnx_session(path: Path, threads: int) -> Any:
    """An ONNX Runtime CPU session with `threads` intra-op threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def runners(
    loaded: LoadedModel, onnx_path: Path, int8_path: Path | None, threads: int
) -> dict[str, Callable[[np.ndarray], Any]]:
    """One call per format: uint8 (B, 1, S, S) numpy in, logits out."""
    module = loaded.deployable()

    def eager(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    calls: dict[str, Callable[[np.ndarray], Any]] = {"eager": eager}
    for fmt, path in (("onnx", onnx_path), ("onnx-int8", int8_path)):
        if path is not None and path.is_file():
            session = onnx_session(path, threads)
            name = session.get_inputs()[0].name
            calls[fmt] = lambda x, s=session, n=name: s.run(None, {n: x})
    return calls


def time_interleaved(
    calls: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, runs: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median and p99 (ms) per format; the formats take turns call by call."""
    times: dict[str, list[float]] = {fmt: [] for fmt in calls}
    for call in calls.values():
        for _ in range(warmup):
            call(x)
    for _ in range(runs):
        for fmt, call in calls.items():
            start = time.perf_counter()
            call(x)
            times[fmt].append((time.perf_counter() - start) * 1000)
    return {
        fmt: {
            "median_ms": float(np.median(t)),
            "p99_ms": float(np.percentile(t, 99)),
            "runs": len(t),
            "images_per_s": float(len(x) * 1000 / np.median(t)),
        }
        for fmt, t in times.items()
    }


def export_random(loaded: LoadedModel, folder: Path, size: int) -> tuple[Path, Path]:
    """fp32 and int8 ONNX files of a random-weight model (int8 calibrated on noise images)."""
    ckpt = loaded.checkpoint
    onnx_path = folder / f"{ckpt.model_name}.onnx"
    meta = export_metadata(ckpt, checkpoint_sha256="random-weights", fmt="onnx")
    write_onnx(loaded.deployable(), onnx_path, size=size, meta=meta)
    int8_path = folder / f"{ckpt.model_name}.int8.onnx"
    noise = np.random.default_rng(0).integers(0, 256, (64, 1, size, size), dtype=np.uint8)
    meta = export_metadata(ckpt, checkpoint_sha256="random-weights", fmt="onnx-int8")
    quantize_onnx(onnx_path, int8_path, noise, meta=meta)
    return onnx_path, int8_path


def measure(
    name: str,
    calls: dict[str, Callable[[np.ndarray], Any]],
    size: int,
    batch: int,
    args: argparse.Namespace,
) -> list[dict[str, Any]]:
    """Rows of (model, batch, format) latencies on random uint8 images."""
    x = np.random.default_rng(batch).integers(0, 256, (batch, 1, size, size), dtype=np.uint8)
    result = time_interleaved(calls, x, args.runs, args.warmup)
    line = "  ".join(f"{fmt} {s['median_ms']:.2f} ms" for fmt, s in result.items())
    print(f"  {name} {size}px batch {batch}: {line}", file=sys.stderr, flush=True)
    return [
        {"model": name, "image_size": size, "batch": batch, "format": fmt, **stats}
        for fmt, stats in result.items()
    ]


def speedups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ORT fp32 vs eager and int8 vs ORT fp32 (ratios of medians), with the targets met."""
    by_key = {(r["model"], r["batch"], r["format"]): r["median_ms"] for r in rows}
    out = []
    for model, batch in dict.fromkeys((r["model"], r["batch"]) for r in rows):
        eager, ort, int8 = (by_key.get((model, batch, fmt)) for fmt in FORMATS)
        row: dict[str, Any] = {"model": model, "batch": batch}
        if eager and ort:
            row["ort_vs_eager"] = eager / ort
            if batch == 1:
                row["ort_target_met"] = eager / ort >= TARGET_ORT_VS_EAGER
        if ort and int8:
            row["int8_vs_ort"] = ort / int8
            row["int8_target_met"] = ort / int8 >= TARGET_INT8_VS_ORT
        out.append(row)
    return out


def render(rows: list[dict[str, Any]], ratios: list[dict[str, Any]], threads: int) -> str:
    """A plain-text table: one line per (model, batch), the formats side by side."""
    by_key = {(r["model"], r["batch"], r["format"]): r for r in rows}
    head = (
        f"{'model':<22}{'batch':>5}  "
        + "".join(f"{fmt + ' med/p99 ms':>24}" for fmt in FORMATS)
        + f"{'ORT/eager':>11}{'int8/ORT':>10}"
    )
    lines = [f"CPU latency, {threads} threads (median / p99 ms per call)", head, "-" * len(head)]
    for ratio in ratios:
        cells = []
        for fmt in FORMATS:
            r = by_key.get((ratio["model"], ratio["batch"], fmt))
            cells.append(f"{r['median_ms']:9.2f} / {r['p99_ms']:8.2f}" if r else "-")
        lines.append(
            f"{ratio['model']:<22}{ratio['batch']:>5}  "
            + "".join(f"{c:>24}" for c in cells)
            + f"{ratio.get('ort_vs_eager', float('nan')):>10.2f}x"
            + f"{ratio.get('int8_vs_ort', float('nan')):>9.2f}x"
        )
    return "\n".join(lines)


def build_report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    accuracy: dict[str, Any] | None,
    seconds: float,
    complete: bool,
) -> dict[str, Any]:
    """The JSON written to --out (rewritten after every measured batch size)."""
    import onnxruntime

    return {
        "machine": {
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "python": platform.python_version(),
            "torch": str(torch.__version__),
            "onnxruntime": onnxruntime.__version__,
            "load_average": list(os.getloadavg()),
            "note": "the cores are shared with other processes: figures carry that noise",
        },
        "settings": {
            "models": args.models,
            "image_size": args.size,
            "batches": args.batches,
            "runs": args.runs,
            "warmup": args.warmup,
            "weights": "random (latency only)",
            "int8": "static QDQ, per-channel int8 weights, uint8 activations, MinMax",
            "command": " ".join(sys.argv),
        },
        "targets": {"ort_vs_eager_batch1": TARGET_ORT_VS_EAGER, "int8_vs_ort": TARGET_INT8_VS_ORT},
        "complete": complete,
        "rows": rows,
        "speedups": speedups(rows),
        "accuracy": accuracy,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cnn", "resnet18", "efficientnet_lite0"])
    ap.add_argument("--size", type=int, default=224, help="image size of the random models")
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--runs", type=int, default=50, help="timed calls per format (>= 50)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", type=Path, default=None, help="also export and time this")
    ap.add_argument("-s", "--settings", action="append", default=[], help="settings file")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="k=v")
    ap.add_argument("--out", type=Path, default=Path("bench/results/latency_cpu.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # as ctscan's runtime does
    started = time.time()
    rows: list[dict[str, Any]] = []
    accuracy: dict[str, Any] = {}

    def save(complete: bool = False) -> dict[str, Any]:
        report = build_report(args, rows, accuracy or None, time.time() - started, complete)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        return report

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        models: list[tuple[str, dict[str, Callable[[np.ndarray], Any]], int]] = []
        if args.checkpoint is not None:
            from ctscan.settings import load_settings

            settings = load_settings(args.settings, args.overrides)
            out = folder / "checkpoint" / "model.onnx"
            result = run_export(settings, args.checkpoint, int8=True, out=out)
            torch.set_num_threads(args.threads)  # run_export sets train.threads
            accuracy.update(export_summary(result), processed_dir=str(settings.paths.processed_dir))
            loaded = load_model(args.checkpoint)
            calls = runners(loaded, out, out.with_name("model.int8.onnx"), args.threads)
            label = f"{loaded.checkpoint.model_name} (checkpoint)"
            models.append((label, calls, loaded.spec.image_size))
        for name in args.models:
            print(f"{name}: exporting", file=sys.stderr, flush=True)
            loaded = random_model(name, args.size)
            onnx_path, int8_path = export_random(loaded, folder, args.size)
            models.append((name, runners(loaded, onnx_path, int8_path, args.threads), args.size))
        for batch in args.batches:  # every model at batch 1 first: an interrupted run keeps them
            for name, calls, size in models:
                rows += measure(name, calls, size, batch, args)
                save()
    report = save(complete=True)
    ratios = report["speedups"]
    print(render(rows, ratios, args.threads))
    if accuracy:
        print(f"\ntest accuracy of {args.checkpoint} ({accuracy['n_test']} images):")
        for row in accuracy["parity"]:
            state = "" if row["accepted"] else f"  ({row['note']})"
            print(
                f"  {row['format']:<10} accuracy {row['accuracy']:.4f}  agreement "
                f"{row['argmax_agreement']:.4f}  max |dlogit| "
                f"{row['max_abs_logit_diff']:.2e}{state}"
            )
    print(f"\nwrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

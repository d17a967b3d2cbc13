"""The model step on CPU, side by side: ONNX Runtime fp32 / int8 QDQ, OpenVINO fp32 / bf16 / int8.

One trained checkpoint, one run, one machine. The fp32 ONNX file is made as `ctscan export`
makes it (`write_onnx`), the int8 files by `quantize_onnx` under each calibration choice in
CHOICES (which train images, which calibration method, which parts stay fp32). Every choice is
gated as `ctscan export --int8` gates it (`int8_refusal`: >= 98% argmax agreement with eager on
the test split, <= 1 point of accuracy), on ONNX Runtime and on OpenVINO (which reads the same
QDQ file and runs its int8 kernels). OpenVINO also runs the fp32 file at f32 and at its default
precision on this CPU (bf16 where the CPU has AVX512_BF16 or AMX), gated the same way.

Timing: per thread count and batch size, the engines take turns call by call (a change of load
hits them alike); median ms per batch over `--runs` calls after `--warmup`, real test images,
uint8 (B, 1, S, S) in. ONNX Runtime sessions use `session_options` (what predict and serve use),
OpenVINO `INFERENCE_NUM_THREADS` with the LATENCY hint. The JSON goes to
bench/results/model_step_<cpu>.json (<cpu>: vnni, avx512 or avx2), rewritten after every batch.

    pip install 'ctscan[openvino]'   # or: pip install openvino
    python bench/model_step.py --checkpoint RUN/best.pt --set paths.processed_dir=STORE
    python bench/model_step.py --checkpoint RUN/best.pt --work /tmp/ms  # again: reuse the files
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctscan.data.store import open_model_store
from ctscan.engine.checkpoint import file_sha256, load_model, read_checkpoint
from ctscan.inference import open_predictor
from ctscan.inference.predictor import openvino_call, session_options
from ctscan.ops.export import (
    compare,
    export_metadata,
    int8_refusal,
    quantize_onnx,
    write_onnx,
)
from ctscan.settings import load_settings

# name: (train images: None = all, calibration method, parts kept in fp32)
CHOICES: dict[str, tuple[int | None, str, tuple[str, ...]]] = {
    "256 spread, minmax": (256, "minmax", ()),  # the export before issue 22
    "train, minmax": (None, "minmax", ()),
    "train, minmax, stem fp32": (None, "minmax", ("stem",)),
    "train, minmax, head fp32": (None, "minmax", ("head",)),
    "train, minmax, stem+head fp32": (None, "minmax", ("stem", "head")),
    "train, minmax-avg": (None, "minmax-avg", ()),
    "train, minmax-avg, stem fp32": (None, "minmax-avg", ("stem",)),  # the export's default
}
SLOW_CHOICES = {  # percentile: ORT's histograms took > 8 minutes on 613 images here
    "train, percentile, stem fp32": (None, "percentile", ("stem",)),
}


def cpu_tag() -> str:
    """vnni (AVX-512 VNNI), avx512 or avx2: the column a figure belongs in."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"


def cpu_name() -> str:
    """The model name line of /proc/cpuinfo."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def ort_call(path: Path, settings: Any) -> Callable[[np.ndarray], np.ndarray]:
    """One ONNX Runtime session as predict and serve open it (threads: train.threads)."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(path), sess_options=session_options(settings), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def ov_call(path: Path, threads: int, precision: str | None) -> Callable[[np.ndarray], np.ndarray]:
    """One OpenVINO CPU infer request as `--backend openvino` makes it (precision fp32 or bf16;
    None: the CPU's default)."""
    return openvino_call(path, threads, precision)[0]


def calibration_images(store: Any, limit: int | None) -> np.ndarray:
    """The train images `ctscan export --int8` calibrates on (all), or `limit` evenly spread."""
    images = store.split("train").images.numpy()
    if limit is None or len(images) <= limit:
        return images
    return images[np.linspace(0, len(images) - 1, limit).round().astype(int)]


def batched(call: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """Logits of every image, 32 at a time."""
    return np.concatenate([call(images[i : i + 32]) for i in range(0, len(images), 32)])


def time_turns(
    calls: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, runs: int, warmup: int
) -> dict[str, float]:
    """Median ms per call of each engine; the engines take turns call by call."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        for _ in range(warmup):
            call(x)
    for _ in range(runs):
        for name, call in calls.items():
            start = time.perf_counter()
            call(x)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: float(np.median(t)) for name, t in times.items()}


def render(report: dict[str, Any]) -> str:
    """Plain-text tables: the gate per engine, then ms per batch and img/s per thread count."""
    lines = [
        f"{report['machine']['cpu']} ({report['machine']['cpu_tag']}), "
        f"load {report['machine']['load_average_start'][0]:.1f} -> "
        f"{report['machine']['load_average_end'][0]:.1f}",
        f"checkpoint {report['checkpoint']}: eager test accuracy {report['eager_accuracy']:.4f} "
        f"({report['n_test']} images)",
        "",
        f"{'engine':<46}{'agreement':>10}{'accuracy':>10}{'max|dlogit|':>12}  gate",
    ]
    for name, gate in report["gate"].items():
        lines.append(
            f"{name:<46}{gate['agreement']:>10.2%}{gate['accuracy']:>10.2%}"
            f"{gate['max_abs_logit_diff']:>12.2e}  {gate['verdict']}"
        )
    for threads in report["settings"]["threads"]:
        rows = [r for r in report["rows"] if r["threads"] == threads]
        batches = sorted({r["batch"] for r in rows})
        cell = {(r["engine"], r["batch"]): r for r in rows}
        lines += ["", f"{threads} thread(s): median ms per batch / images per s (x ORT fp32)"]
        lines.append(f"{'engine':<46}" + "".join(f"{'batch ' + str(b):>24}" for b in batches))
        for name in dict.fromkeys(r["engine"] for r in rows):
            cells = []
            for b in batches:
                r = cell.get((name, b))
                cells.append(
                    f"{r['median_ms']:.1f} / {r['images_per_s']:.0f} ({r['vs_ort_fp32']:.2f}x)"
                    if r
                    else "-"
                )
            lines.append(f"{name:<46}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4, 8, 16, 32])
    ap.add_argument("--threads", nargs="+", type=int, default=[2, 1])
    ap.add_argument("--runs", type=int, default=30, help="timed calls per engine and batch")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument(
        "--choices", nargs="+", default=list(CHOICES), help="int8 choices to make (CHOICES)"
    )
    ap.add_argument("-s", "--settings", action="append", default=[], help="settings file")
    ap.add_argument("--set", action="append", default=[], dest="overrides", help="k=v")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="keep the model files here and reuse them "
        "(the same checkpoint only; default: a temporary folder)",
    )
    args = ap.parse_args()
    out = args.out or Path(f"bench/results/model_step_{cpu_tag()}.json")

    import onnxruntime
    import openvino
    import torch

    started, load_start = time.time(), os.getloadavg()
    base = [*args.overrides, "train.device=cpu", "train.precision=fp32"]
    settings = load_settings(args.settings, [*base, f"train.threads={max(args.threads)}"])
    ckpt = read_checkpoint(args.checkpoint)
    store = open_model_store(settings, ckpt)  # the store the checkpoint was trained on
    test = store.split("test")
    images, labels = np.ascontiguousarray(test.images.numpy()), test.labels.numpy()
    reference = open_predictor(args.checkpoint, settings=settings, backend="torch").logits(images)
    eager = compare("eager", args.checkpoint, reference, reference, labels)

    folder = args.work or Path(tempfile.mkdtemp(prefix="ctscan-model-step-"))
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = folder / "model.onnx"
    sha = file_sha256(args.checkpoint)
    meta = export_metadata(ckpt, checkpoint_sha256=sha, fmt="onnx")
    if not fp32.is_file():
        write_onnx(load_model(ckpt).deployable(), fp32, size=ckpt.spec.image_size, meta=meta)
    files: dict[str, Path] = {"fp32": fp32}
    choices: dict[str, Any] = {}
    for name in args.choices:
        limit, method, keep = {**CHOICES, **SLOW_CHOICES}[name]
        path = folder / f"model.int8-{'-'.join(str(v) for v in (limit, method, *keep))}.onnx"
        meta = export_metadata(ckpt, checkpoint_sha256=sha, fmt="onnx-int8")
        tick = time.time()
        calib = calibration_images(store, limit)
        if not path.is_file():
            quantize_onnx(fp32, path, calib, meta=meta, keep_fp32=keep, method=method)
        choices[name] = {
            "calibration_images": len(calib),
            "method": method,
            "fp32_parts": list(keep),
            "seconds": time.time() - tick,
        }
        files[f"int8 {name}"] = path
        print(f"made int8 '{name}' ({time.time() - tick:.0f} s)", file=sys.stderr, flush=True)

    def engines(threads: int) -> dict[str, Callable[[np.ndarray], Any]]:
        s = load_settings(args.settings, [*base, f"train.threads={threads}"])
        calls: dict[str, Callable[[np.ndarray], Any]] = {"ORT fp32": ort_call(fp32, s)}
        calls["OpenVINO f32"] = ov_call(fp32, threads, "fp32")
        calls["OpenVINO default (bf16 here)"] = ov_call(fp32, threads, None)
        for name in choices:
            calls[f"ORT int8 {name}"] = ort_call(files[f"int8 {name}"], s)
            calls[f"OpenVINO int8 {name}"] = ov_call(files[f"int8 {name}"], threads, None)
        return calls

    gate: dict[str, Any] = {}
    for name, call in engines(max(args.threads)).items():
        row = compare(name, fp32, batched(call, images), reference, labels)
        refusal = int8_refusal(row, eager)
        gate[name] = {
            "agreement": row.agreement,
            "accuracy": row.accuracy,
            "max_abs_logit_diff": row.max_abs_diff,
            "passes": refusal is None,
            "verdict": "pass" if refusal is None else "REFUSED",
        }

    rows: list[dict[str, Any]] = []

    def report(complete: bool) -> dict[str, Any]:
        return {
            "machine": {
                "cpu": cpu_name(),
                "cpu_tag": cpu_tag(),
                "cores": os.cpu_count(),
                "python": platform.python_version(),
                "torch": str(torch.__version__),
                "onnxruntime": onnxruntime.__version__,
                "openvino": openvino.__version__,
                "load_average_start": list(load_start),
                "load_average_end": list(os.getloadavg()),
                "note": "shared cores: other processes add noise; compare rows of one run only",
            },
            "settings": {
                "batches": args.batches,
                "threads": args.threads,
                "runs": args.runs,
                "warmup": args.warmup,
                "command": " ".join(["python", *sys.argv]),
            },
            "checkpoint": str(args.checkpoint),
            "model_name": ckpt.model_name,
            "image_size": ckpt.spec.image_size,
            "n_test": len(labels),
            "eager_accuracy": eager.accuracy,
            "int8_choices": choices,
            "gate": gate,
            "rows": rows,
            "complete": complete,
            "seconds": time.time() - started,
        }

    for threads in args.threads:
        calls = engines(threads)
        torch.set_num_threads(threads)
        for batch in args.batches:
            x = np.ascontiguousarray(images[np.arange(batch) % len(images)])
            medians = time_turns(calls, x, args.runs, args.warmup)
            for name, ms in medians.items():
                rows.append(
                    {
                        "engine": name,
                        "threads": threads,
                        "batch": batch,
                        "median_ms": ms,
                        "images_per_s": batch * 1000 / ms,
                        "vs_ort_fp32": medians["ORT fp32"] / ms,
                    }
                )
            print(f"  {threads} thread(s), batch {batch}: done", file=sys.stderr, flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(report(False), indent=2) + "\n")
    if args.work is None:
        shutil.rmtree(folder, ignore_errors=True)
    final = report(True)
    out.write_text(json.dumps(final, indent=2) + "\n")
    print(render(final))
    print(f"\nwrote {out} ({final['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

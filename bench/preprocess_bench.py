"""Benchmark `ctscan preprocess` on the real raw images against a bare single-process PIL loop.

    python bench/preprocess_bench.py [--raw-dir data/chest-ctscan-images] [--repeat 3]

Rows: the full preprocess (decode, gray, hashes, dHash, thumbnails, resize, audit, leak policy,
mean/std, atomic store write) with a pool of all cores and with one process, and the bare loop
`Image.open(p).convert("L").resize((S, S), BILINEAR)` that does only the pixel work. Also the
store's size on disk against the predecessor's float32 RGB 224x224 tensors. Prints a table and
writes JSON to bench/results/preprocess.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
from PIL import Image

from ctscan.data.preprocess import run_preprocess
from ctscan.data.raw import discover
from ctscan.settings import Settings

PREDECESSOR_SIDE = 224  # float32 RGB 224x224 per image


def bare_baseline(paths: list[Path], size: int) -> np.ndarray:
    """Decode, gray and stretch-resize every image in one process: (N, S, S) uint8."""
    out = []
    for path in paths:
        with Image.open(path) as img:
            out.append(np.asarray(img.convert("L").resize((size, size), Image.Resampling.BILINEAR)))
    return np.stack(out)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (pool workers)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _timed(fn, repeat: int) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds of `repeat` calls (CPU time is robust to a busy machine)."""
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - start_cpu)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw-dir", type=Path, default=Path("data/chest-ctscan-images"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=Path("bench/results/preprocess.json"))
    args = parser.parse_args(argv)
    if not args.raw_dir.is_dir():
        print(f"raw data folder '{args.raw_dir}' not found: run `dvc pull` first.", file=sys.stderr)
        return 2
    paths = [r.path for r in discover(args.raw_dir)]
    settings = Settings(data={"image_size": args.image_size})
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="ctscan-bench-") as tmp:
        store = Path(tmp) / "processed"
        rows = {
            f"preprocess, pool of {cores}": _timed(
                lambda: run_preprocess(settings, args.raw_dir, store), args.repeat
            ),
            "preprocess, 1 process": _timed(
                lambda: run_preprocess(settings, args.raw_dir, store, workers=1), args.repeat
            ),
            "bare PIL loop, 1 process": _timed(
                lambda: bare_baseline(paths, args.image_size), args.repeat
            ),
        }
        files = {f.name: f.stat().st_size for f in sorted(Path(store).iterdir()) if f.is_file()}
        store_bytes = sum(files.values())
    predecessor = len(paths) * 3 * PREDECESSOR_SIDE * PREDECESSOR_SIDE * 4
    result = {
        "raw_dir": str(args.raw_dir),
        "images": len(paths),
        "image_size": args.image_size,
        "repeat": args.repeat,
        "cpu_count": cores,
        "load_average_after": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "pillow": PIL.__version__,
        "numpy": np.__version__,
        "seconds": {name: wall for name, (wall, _) in rows.items()},
        "median_seconds": {name: statistics.median(wall) for name, (wall, _) in rows.items()},
        "min_seconds": {name: min(wall) for name, (wall, _) in rows.items()},
        "cpu_seconds": {name: cpu for name, (_, cpu) in rows.items()},
        "median_cpu_seconds": {name: statistics.median(cpu) for name, (_, cpu) in rows.items()},
        "store_bytes": store_bytes,
        "store_files": files,
        "predecessor_bytes": predecessor,
        "predecessor_over_store": predecessor / store_bytes,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"preprocess, {len(paths)} images -> {args.image_size}px, {cores} cores")
    table.add_column("what")
    table.add_column("median wall s", justify="right")
    table.add_column("min wall s", justify="right")
    table.add_column("median CPU s", justify="right")
    table.add_column("wall runs (s)")
    for name, (wall, cpu) in rows.items():
        table.add_row(
            name,
            f"{statistics.median(wall):.2f}",
            f"{min(wall):.2f}",
            f"{statistics.median(cpu):.2f}",
            ", ".join(f"{t:.2f}" for t in wall),
        )
    table.add_row("store on disk", f"{store_bytes / 1e6:.1f} MB", "", "", "")
    table.add_row(
        "predecessor float32 RGB 224",
        f"{predecessor / 1e6:.1f} MB",
        "",
        "",
        f"{result['predecessor_over_store']:.1f}x the store",
    )
    load = result["load_average_after"]
    if load:
        table.caption = f"load average after: {load[0]:.1f} (on {cores} cores)"
    Console().print(table)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""PNG decoding for the input path: Pillow against libspng (pyspng), on the real test PNGs.

Rows, each over every file, medians over `--repeats`:
- `decode`: the pixels alone, `Image.open(...).load()` against `pyspng.load(...)`;
- `prepare`: `transforms.prepare` (checks, decode, gray, resize: what predict and serve run per
  image) with its libspng path and with Pillow only;
- `prepare, N threads`: the same over a pool of N threads (wall images/s), as predict and serve
  decode: pyspng holds the GIL while it decodes, Pillow releases it.
CPU ms per image are the process's CPU time (all threads); the files are read into memory first.

    python bench/decode_bench.py --images data/chest-ctscan-images/test
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import pyspng
from PIL import Image

from ctscan.data import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import write_result


def pillow_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()


def timed(run: Callable[[bytes], object], files: list[bytes], threads: int) -> tuple[float, float]:
    """(wall images/s, CPU ms per image) of `run` over every file."""
    wall, cpu = time.perf_counter(), time.process_time()
    if threads == 1:
        for data in files:
            run(data)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, files))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return len(files) / wall, 1e3 * cpu / len(files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, default=Path("data/chest-ctscan-images/test"))
    ap.add_argument("--limit", type=int, default=0, help="only the first N files (0: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--size", type=int, default=160, help="the model input side")
    ap.add_argument("--out", type=Path, default=Path("bench/results/decode.json"))
    args = ap.parse_args()

    files = [p.read_bytes() for p in sorted(args.images.rglob("*.png"))]
    files = files[: args.limit or None]

    def prepare(data: bytes) -> object:
        return transforms.prepare(data, args.size)

    cases = [
        ("decode", "pillow", pillow_decode, 1),
        ("decode", "libspng", pyspng.load, 1),
        *(
            (f"prepare, {n} thread{'s' * (n > 1)}", decoder, prepare, n)
            for n in (1, *args.threads)
            for decoder in ("pillow", "libspng")
        ),
    ]
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {c[:2]: [] for c in cases}
    for repeat in range(args.repeats + 1):  # the first: warm-up (the file cache, first calls)
        for what, decoder, run, threads in cases:  # in turn: a change of load hits all alike
            with mock.patch.object(  # Pillow only: ctscan's libspng path turned off
                transforms,
                "_decode_png",
                (lambda data, img: None) if decoder == "pillow" else transforms._decode_png,
            ):
                figures = timed(run, files[:8] if repeat == 0 else files, threads)
            if repeat:
                runs[what, decoder].append(figures)

    rows = []
    for (what, decoder), figures in runs.items():
        row = {
            "what": what,
            "decoder": decoder,
            "images_per_s": statistics.median(f[0] for f in figures),
            "cpu_ms_per_image": statistics.median(f[1] for f in figures),
            "runs": figures,
        }
        rows.append(row)
        print(
            f"{what:>18}  {decoder:>8}  {row['images_per_s']:8.1f} img/s  "
            f"{row['cpu_ms_per_image']:6.2f} CPU ms/image"
        )
    mean_bytes = sum(map(len, files)) / max(1, len(files))
    write_result(args, rows, images=len(files), mean_file_bytes=mean_bytes)


if __name__ == "__main__":
    main()

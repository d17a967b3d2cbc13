"""Start-up time of `ctscan --help` and `ctscan --version` (median of N runs), written as JSON.

python bench/cli_startup.py --runs 15
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], runs: int) -> dict[str, float]:
    subprocess.run(cmd, capture_output=True, check=True)  # warm the file cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--out", default="bench/results/cli_startup.json")
    args = ap.parse_args()
    exe = shutil.which("ctscan") or "ctscan"
    rows = {
        "ctscan --help": timed([exe, "--help"], args.runs),
        "ctscan --version": timed([exe, "--version"], args.runs),
        "python -c pass (interpreter floor)": timed([sys.executable, "-c", "pass"], args.runs),
        "python -c 'import torch' (what --help avoids)": timed(
            [sys.executable, "-c", "import torch"], max(3, args.runs // 5)
        ),
    }
    for name, row in rows.items():
        print(f"{name:<48} median {row['median_s']:.3f} s  (min {row['min_s']:.3f})")
    report = {
        "machine": platform.processor() or platform.machine(),
        "runs": args.runs,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

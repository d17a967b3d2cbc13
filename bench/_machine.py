"""The CPU a figure comes from (its model name and the flags that set its column), and the JSON.

Importable from other bench scripts (bench/ is not a package):

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import cpu_facts, write_result
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni")


def cpu_facts() -> dict[str, Any]:
    """Model name, the vector flags ctscan's figures depend on, the column tag, core count."""
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in text.splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown",
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")),
        [],
    )
    tag = "vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"
    return {
        "cpu": name,
        "cpu_tag": tag,
        "flags": [f for f in FLAGS if f in flags],
        "cores": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "load_avg_1m": os.getloadavg()[0],
    }


def write_result(args: argparse.Namespace, rows: list[dict[str, Any]], **facts: Any) -> None:
    """`{machine, settings, facts..., rows}` as JSON to `args.out`."""
    settings = {k: str(v) for k, v in vars(args).items()}
    result = {"machine": cpu_facts(), "settings": settings, **facts, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")

"""Where a /predict request's time goes: the server's per-stage timers at 1 and N clients.

Starts a real `ctscan serve MODEL` (a checkpoint or an ONNX file; 1 worker, default settings plus
`--set`), drives it with closed-loop clients over real test PNGs (bench/serve_load.py's client)
and reads `ctscan_stage_seconds{stage,clock}` from /metrics before and after each run. Per
request: wall and CPU ms of each stage (bytes in, multipart parse, decode to gray, resize, queue
wait, model, metrics + drift window, JSON out), the server's whole CPU (its process tree, from
/proc) and what no stage accounts for (uvicorn's HTTP, routing, middleware, thread hops), the
client's CPU, req/s and client-side latency. The model stage's CPU is the model thread's plus
ONNX Runtime's pool threads', shared among the images of each call; its wall is the call's.

    python bench/serve_budget.py --model outputs/runs/main-latest/best.pt
    python bench/serve_budget.py --model best.int8.onnx --clients 1,16 --seconds 20 --raw
    python bench/serve_budget.py --model best.int8.onnx --small 160   # bodies shrunk by the client
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from ctscan.serve.metrics import STAGES
from serve_load import (
    IMAGE_SUFFIXES,
    closed_loop,
    cpu_flags,
    cpu_name,
    free_port,
    multipart_bodies,
    raw_bodies,
    small_bodies,
    start_server,
    stop_server,
    tree_cpu_s,
)


def scrape(base: str) -> dict[tuple[str, ...], float]:
    """(sample name, *label values) -> value of the stage timers and the /predict counters."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name.startswith("ctscan_stage_seconds"):
                out[sample.name, labels["stage"], labels["clock"]] = sample.value
            elif labels.get("route") == "/predict" and labels.get("status", "200") == "200":
                out[(sample.name,)] = sample.value
    return out


def budget(before: dict, after: dict) -> dict[str, dict[str, float | None]]:
    """Per stage: mean wall and CPU ms per image that went through it."""
    out = {}
    for stage in STAGES:
        row: dict[str, float | None] = {}
        for clock in ("wall", "cpu"):
            count, total = (
                after.get((f"ctscan_stage_seconds_{part}", stage, clock), 0.0)
                - before.get((f"ctscan_stage_seconds_{part}", stage, clock), 0.0)
                for part in ("count", "sum")
            )
            row[f"{clock}_ms"] = round(1000 * total / count, 3) if count else None
        out[stage] = row
    return out


def run_load(base: str, pid: int, bodies: list[bytes], types: list[str], **load: Any) -> dict:
    """One closed-loop run: the budget per request, CPU per request, throughput, latency."""
    url = f"{base}/predict"
    if load["warmup"] > 0:
        asyncio.run(
            closed_loop(url, bodies, types, clients=load["clients"], seconds=load["warmup"])
        )
    before, server0, client0 = scrape(base), tree_cpu_s(pid), time.process_time()
    latencies, errors, elapsed = asyncio.run(
        closed_loop(url, bodies, types, clients=load["clients"], seconds=load["seconds"])
    )
    after, server1, client1 = scrape(base), tree_cpu_s(pid), time.process_time()
    n = max(1, len(latencies))
    stages = budget(before, after)
    stage_cpu = sum(row["cpu_ms"] or 0.0 for row in stages.values())
    stage_wall = sum(row["wall_ms"] or 0.0 for row in stages.values())
    server_cpu = 1000 * (server1 - server0) / n if None not in (server0, server1) else None
    key = ("ctscan_request_latency_seconds_sum",)
    count = ("ctscan_request_latency_seconds_count",)
    request_wall = 1000 * (after[key] - before[key]) / max(1.0, after[count] - before[count])
    ms = np.array(latencies) * 1000
    return {
        "clients": load["clients"],
        "requests_ok": len(latencies),
        "errors": sum(errors.values()),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            f"p{q}": round(float(np.percentile(ms, q)), 2) if len(ms) else None
            for q in (50, 95, 99)
        },
        "stages": stages,
        "server_cpu_ms": round(server_cpu, 3) if server_cpu is not None else None,
        "unattributed_cpu_ms": round(server_cpu - stage_cpu, 3) if server_cpu else None,
        "server_wall_ms": round(request_wall, 3),
        "unattributed_wall_ms": round(request_wall - stage_wall, 3),
        "client_cpu_ms": round(1000 * (client1 - client0) / n, 3),
    }


def render(report: dict[str, Any]) -> str:
    runs = report["runs"]
    head = f"{'ms per request':<22}" + "".join(
        f" {str(r['clients']) + 'c wall':>10} {str(r['clients']) + 'c cpu':>10}" for r in runs
    )
    lines = [head, "-" * len(head)]
    for stage in STAGES:
        cells = "".join(
            f" {r['stages'][stage]['wall_ms']!s:>10} {r['stages'][stage]['cpu_ms']!s:>10}"
            for r in runs
        )
        lines.append(f"{stage:<22}{cells}")
    for name, wall, cpu in (
        ("unattributed (HTTP...)", "unattributed_wall_ms", "unattributed_cpu_ms"),
        ("server total", "server_wall_ms", "server_cpu_ms"),
        ("client", None, "client_cpu_ms"),
    ):
        cells = "".join(f" {r[wall] if wall else '':>10} {r[cpu]!s:>10}" for r in runs)
        lines.append(f"{name:<22}{cells}")
    lines.append("")
    for r in runs:
        lat = r["latency_ms"]
        lines.append(
            f"{r['clients']:>3} clients: {r['requests_per_s']} req/s, p50 {lat['p50']} ms, "
            f"p99 {lat['p99']} ms, {r['errors']} errors"
        )
    lines.append("ms per request (per image for the stages); cpu: thread CPU of the work")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, required=True, help="best.pt or an .onnx file")
    ap.add_argument("--images", type=Path, default=Path("data/chest-ctscan-images/test"))
    ap.add_argument("--clients", default="1,16", help="comma-separated client counts")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=3.0, help="uncounted seconds first")
    ap.add_argument("--raw", action="store_true", help="the image as the body, not multipart")
    ap.add_argument(
        "--small",
        type=int,
        default=None,
        metavar="SIZE",
        help="raw bodies shrunk by the client to SIZE px on the long side (the model's input)",
    )
    ap.add_argument("--set", dest="sets", action="append", default=[], help="server --set")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve_budget.json"))
    args = ap.parse_args()

    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        ap.error(f"no PNG/JPEG under {args.images}: run `make data`, or pass --images")
    if args.small:
        bodies, types, _ = small_bodies(images, args.small)
    else:
        bodies, types = raw_bodies(images) if args.raw else multipart_bodies(images)
    runs = []
    with tempfile.TemporaryDirectory(prefix="ctscan-serve-budget-") as tmp:
        port = free_port()
        proc, startup = start_server(
            args.model,
            port=port,
            runs_dir=Path(tmp) / "runs",
            backend="auto",
            batching=True,
            log=Path(tmp) / "serve.log",
            sets=tuple(args.sets),
        )
        try:
            for clients in (int(c) for c in args.clients.split(",")):
                print(f"{clients} clients...", file=sys.stderr)
                runs.append(
                    run_load(
                        f"http://127.0.0.1:{port}",
                        proc.pid,
                        bodies,
                        types,
                        clients=clients,
                        seconds=args.seconds,
                        warmup=args.warmup,
                    )
                )
        finally:
            stop_server(proc)
    report = {
        "bench": "serve_budget",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu": cpu_name(),
            "cpu_flags": cpu_flags(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "model": str(args.model),
        "body": f"raw, shrunk to {args.small} px"
        if args.small
        else "raw"
        if args.raw
        else "multipart",
        "server_sets": args.sets,
        "startup_s": round(startup, 2),
        "images": len(images),
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"\nwritten: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

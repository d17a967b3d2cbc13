"""Load on `ctscan serve`: N concurrent clients on POST /predict, side by side, and cold starts.

Each configuration gets its own server process (`python -m ctscan serve CKPT` on 127.0.0.1),
one after the other: ONNX Runtime with dynamic batching (the default), ONNX with batching off,
PyTorch with batching, ONNX with the image as the raw request body (no multipart), and the int8
ONNX file (`--int8`, default best.int8.onnx beside the checkpoint; skipped when it is missing)
with raw bodies; both again with `-small` bodies: the slice shrunk by the client to the model's
input side, as the web page and docs/serving.md do (the script checks that the server gives the
model the same pixels for the small and the full file, and records how many did);
`onnx-batch4` and `onnx-batch4-2w` (2 workers of 1 thread each) on request, and on request the
OpenVINO backend (`pip install 'ctscan[openvino]'`) with small raw bodies: `openvino-raw-small`
serves the exported float32 file (`--onnx`, default best.onnx beside the checkpoint, written by
`ctscan export` with openvino installed: its verdict lets OpenVINO use the CPU's default
precision, bf16 with AVX512_BF16 or AMX), `openvino-fp32-raw-small` the checkpoint (its cached
export has no verdict: fp32), `openvino-int8-raw-small` the int8 file (refused without an
accepted verdict). Each row records the backend, format and precision the server's /ready gave.
Against each, `--clients` closed-loop clients (each sends its next request when the last one is
answered) post real test PNGs for `--seconds` after
`--warmup` seconds that are not counted. Reported per configuration: requests/s (answered 200),
p50/p95/p99 client-side latency, errors, the mean batch the server formed (from /metrics) and
the CPU the server and the client used (on a 2-core machine they compete for it).

The client is one asyncio process with httpx: the multipart bodies are built once, so the client
spends its CPU on HTTP only; the CPU it takes, and what the rest of the machine takes, are in the
table and the JSON. Locust was not used: on 2 cores its Python workers would compete with the
server for the same cores, and a closed loop of 16 async clients is all this load needs.

Cold start: process start to the first `/ready` 200. The first configuration starts from an
empty cache (`paths.runs_dir` is a fresh folder), so it exports the checkpoint to ONNX and checks
it against the eager model; the second start finds the export in the cache; the torch start
exports nothing; last, the cached ONNX file is served directly (no PyTorch model, no /explain).

Targets (issue 22, per CPU kind: the JSON names the CPU and its SIMD flags): the best
configuration >= 300 requests/s with p99 <= 80 ms on an AVX-512 + VNNI CPU, >= 150 with p99 <=
150 ms on AVX2, 0 errors.

    python bench/serve_load.py --checkpoint outputs/runs/x/best.pt
    python bench/serve_load.py --checkpoint best.pt --seconds 20 --configs onnx-raw,int8-raw
    python bench/serve_load.py --checkpoint best.pt --configs onnx-raw-small,openvino-raw-small
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import io
import json
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

TARGETS = {"avx512_vnni": (300.0, 80.0), "avx2": (150.0, 150.0)}  # req/s, p99 ms
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Config:
    """One server configuration."""

    name: str
    backend: str
    batching: bool
    sets: tuple[str, ...] = ()  # more `--set` overrides of the server
    raw: bool = False  # the image as the body, not a multipart form
    int8: bool = False  # serve the --int8 file instead of the checkpoint
    onnx: bool = False  # serve the --onnx file (float32, exported) instead of the checkpoint
    small: bool = False  # raw bodies shrunk by the client to the model's input side first


CONFIGS = (
    Config("onnx-batching", "onnx", True),
    Config("onnx-no-batching", "onnx", False),
    Config("torch-batching", "torch", True),
    Config("onnx-raw", "onnx", True, raw=True),
    Config("int8-raw", "onnx", True, raw=True, int8=True),
    Config("onnx-raw-small", "onnx", True, raw=True, small=True),
    Config("int8-raw-small", "onnx", True, raw=True, int8=True, small=True),
    Config("onnx-batch4", "onnx", True, ("serve.max_batch_size=4",)),
    Config(
        "onnx-batch4-2w",
        "onnx",
        True,
        ("serve.max_batch_size=4", "serve.workers=2", "train.threads=1"),
    ),
    Config("openvino-raw-small", "openvino", True, raw=True, small=True, onnx=True),
    Config("openvino-fp32-raw-small", "openvino", True, raw=True, small=True),
    Config("openvino-int8-raw-small", "openvino", True, raw=True, int8=True, small=True),
)
DEFAULT_CONFIGS = (
    "onnx-batching",
    "onnx-no-batching",
    "torch-batching",
    "onnx-raw",
    "int8-raw",
    "onnx-raw-small",
    "int8-raw-small",
)


# ---- machine and process facts -----------------------------------------------------------


def cpu_name() -> str:
    """The CPU model line of /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The SIMD flags of /proc/cpuinfo that decide the model's speed (AVX2, AVX-512, VNNI, AMX)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = set(re.search(r"^flags\s*:(.*)$", text, re.MULTILINE).group(1).split())
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma", "sse4")) or "vnni" in f)


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process and its reaped children (Linux /proc), or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def tree_cpu_s(pid: int) -> float | None:
    """CPU seconds of a process and its live children (uvicorn workers), or None."""
    total = process_cpu_s(pid)
    if total is None:
        return None
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # ppid
            total += process_cpu_s(int(stat.parent.name)) or 0.0
    return total


def machine_busy_s() -> float | None:
    """CPU seconds all processes have used so far (Linux /proc/stat, all cores), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---- the server --------------------------------------------------------------------------


def start_server(
    model: Path,
    *,
    port: int,
    runs_dir: Path,
    backend: str,
    batching: bool,
    log: Path,
    sets: tuple[str, ...] = (),
) -> tuple[subprocess.Popen[bytes], float]:
    """(the server process, seconds from its start to the first /ready 200)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    command = [
        sys.executable,
        "-m",
        "ctscan",
        "serve",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend",
        backend,
        "--set",
        f'paths.runs_dir="{runs_dir}"',
        "--set",
        f"serve.batching={'true' if batching else 'false'}",
        *(arg for item in sets for arg in ("--set", item)),
    ]
    start = time.perf_counter()
    with log.open("wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/ready"
    with httpx.Client(timeout=1.0) as client:
        while time.perf_counter() - start < READY_TIMEOUT_S:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log)}")
            try:
                if client.get(url).status_code == 200:
                    return proc, time.perf_counter() - start
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    stop_server(proc)
    raise RuntimeError(f"server not ready after {READY_TIMEOUT_S} s:\n{_tail(log)}")


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {log})"


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def batch_totals(base: str) -> tuple[float, float, float]:
    """(images, model calls, model-call seconds) so far, from the server's /metrics."""
    text = httpx.get(f"{base}/metrics", timeout=10).text

    def value(name: str) -> float:
        found = re.search(rf"^{name}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else float("nan")

    return (
        value("ctscan_batch_size_sum"),
        value("ctscan_batch_size_count"),
        value("ctscan_model_call_seconds_sum"),
    )


# ---- the client --------------------------------------------------------------------------


def multipart_bodies(images: list[Path]) -> tuple[list[bytes], list[str]]:
    """The request bodies (field `file`), built once, and their content types."""
    boundary = uuid.uuid4().hex
    bodies = []
    for path in images:
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        bodies.append(head + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode())
    return bodies, [f"multipart/form-data; boundary={boundary}"] * len(bodies)


def raw_bodies(images: list[Path]) -> tuple[list[bytes], list[str]]:
    """The files themselves as request bodies, and their content types."""
    types = ["image/png" if p.suffix.lower() == ".png" else "image/jpeg" for p in images]
    return [p.read_bytes() for p in images], types


def small_png(path: Path, size: int) -> bytes:
    """What a client (docs/serving.md, the web page) may send: the slice in gray with its long
    side shrunk to the model's input side `size`, as a PNG (resize policy "pad")."""
    from PIL import Image

    with Image.open(path) as img:
        gray = img.convert("L")
    scale = size / max(gray.size)
    if scale < 1:
        shape = (round(gray.width * scale), round(gray.height * scale))
        gray = gray.resize(shape, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    return buffer.getvalue()


def small_bodies(images: list[Path], size: int) -> tuple[list[bytes], list[str], int]:
    """The shrunk PNG bodies, their content types, and how many give the model exactly the
    pixels the full file gives it (the server's own decode + resize on both)."""
    from ctscan.data.transforms import prepare

    bodies = [small_png(path, size) for path in images]
    same = sum(
        np.array_equal(prepare(path.read_bytes(), size), prepare(body, size))
        for path, body in zip(images, bodies, strict=True)
    )
    return bodies, ["image/png"] * len(bodies), same


async def closed_loop(
    url: str, bodies: list[bytes], types: list[str], *, clients: int, seconds: float
) -> tuple[list[float], dict[str, int], float]:
    """(latencies in s of the 200s, error counts by kind, elapsed s) of `clients` loops."""
    latencies: list[float] = []
    errors: dict[str, int] = {}
    counter = iter(range(10**12))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30.0) as client:
        start = time.perf_counter()
        deadline = start + seconds

        async def loop() -> None:
            while time.perf_counter() < deadline:
                i = next(counter) % len(bodies)
                sent = time.perf_counter()
                try:
                    reply = await client.post(
                        url, content=bodies[i], headers={"content-type": types[i]}
                    )
                    kind = None if reply.status_code == 200 else f"http {reply.status_code}"
                except httpx.HTTPError as exc:
                    kind = type(exc).__name__
                if kind is None:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors[kind] = errors.get(kind, 0) + 1

        await asyncio.gather(*(loop() for _ in range(clients)))
        elapsed = time.perf_counter() - start
    return latencies, errors, elapsed


def measure(
    base: str,
    server_pid: int,
    bodies: list[bytes],
    types: list[str],
    *,
    clients: int,
    seconds: float,
    warmup: float,
) -> dict[str, Any]:
    """One configuration under load: throughput, latency, errors, batches, CPU."""
    url = f"{base}/predict"
    if warmup > 0:
        asyncio.run(closed_loop(url, bodies, types, clients=clients, seconds=warmup))
    images0, calls0, model_s0 = batch_totals(base)
    server0, client0, busy0 = tree_cpu_s(server_pid), time.process_time(), machine_busy_s()
    latencies, errors, elapsed = asyncio.run(
        closed_loop(url, bodies, types, clients=clients, seconds=seconds)
    )
    server1, client1, busy1 = tree_cpu_s(server_pid), time.process_time(), machine_busy_s()
    images1, calls1, model_s1 = batch_totals(base)
    ms = np.array(latencies) * 1000
    calls = calls1 - calls0
    return {
        "requests_ok": len(latencies),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "seconds": round(elapsed, 2),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            name: round(float(np.percentile(ms, q)), 1) if len(ms) else None
            for name, q in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
        },
        "mean_batch": round((images1 - images0) / calls, 2) if calls > 0 else None,
        "model_call_ms": round(1000 * (model_s1 - model_s0) / calls, 1) if calls > 0 else None,
        "server_cpu_cores": (
            round((server1 - server0) / elapsed, 2)
            if server0 is not None and server1 is not None
            else None
        ),
        "client_cpu_cores": round((client1 - client0) / elapsed, 2),
        # answers per CPU second the server got: what an idle machine's cores would give
        "requests_per_server_cpu_s": (
            round(len(latencies) / (server1 - server0), 1)
            if server0 is not None and server1 is not None and server1 > server0
            else None
        ),
        # what the rest of the machine (other users of the shared cores) took meanwhile
        "other_cpu_cores": (
            round(((busy1 - busy0) - (server1 - server0) - (client1 - client0)) / elapsed, 2)
            if None not in (busy0, busy1, server0, server1)
            else None
        ),
    }


# ---- the run -----------------------------------------------------------------------------


def describe_checkpoint(path: Path) -> dict[str, Any]:
    from ctscan.engine.checkpoint import read_checkpoint
    from ctscan.files import file_sha256

    ckpt = read_checkpoint(path)
    return {
        "path": str(path),
        "sha256": file_sha256(path),
        "model": ckpt.model_name,
        "image_size": ckpt.spec.image_size,
        "resize": ckpt.spec.resize,
        "epochs_trained": ckpt.epoch,
        ckpt.select_metric: ckpt.best_value,
    }


def render(report: dict[str, Any]) -> str:
    head = (
        f"{'configuration':<28} {'start s':>7} {'req/s':>7} {'p50 ms':>7} {'p95 ms':>7} "
        f"{'p99 ms':>7} {'errors':>6} {'batch':>6} {'srv cpu':>7} {'cli cpu':>7} {'others':>7} "
        f"{'req/cpu-s':>9}"
    )
    lines = [head, "-" * len(head)]
    for row in report["configurations"]:
        lat = row["latency_ms"]
        lines.append(
            f"{row['name']:<28} {row['startup_s']:>7.1f} {row['requests_per_s']:>7.1f} "
            f"{lat['p50']:>7} {lat['p95']:>7} {lat['p99']:>7} {row['errors']:>6} "
            f"{row['mean_batch']!s:>6} {row['server_cpu_cores']!s:>7} "
            f"{row['client_cpu_cores']!s:>7} {row['other_cpu_cores']!s:>7} "
            f"{row['requests_per_server_cpu_s']!s:>9}"
        )
    lines.append(
        "latency: client side; batch: mean images per model call (/metrics); srv / cli / others:"
        " CPU cores used by the server, the load client and the rest of the machine;"
        " req/cpu-s: answers per CPU second the server got"
    )
    lines.append("")
    lines.append("cold start (process start -> /ready 200)")
    for row in report["cold_start"]:
        lines.append(f"  {row['seconds']:>6.1f} s  {row['what']}")
    target = report["target"]
    verdict = {True: "met", False: "NOT met", None: "not run"}[target["met"]]
    lines.append("")
    lines.append(
        f"target on {target['cpu_kind']} (best configuration >= {target['requests_per_s']:.0f} "
        f"req/s, p99 <= {target['p99_ms']:.0f} ms, 0 errors): {verdict}"
    )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="best.pt to serve")
    ap.add_argument(
        "--images",
        type=Path,
        default=Path("data/chest-ctscan-images/test"),
        help="folder of real slices sent as request bodies (default: the test split)",
    )
    ap.add_argument("--seconds", type=float, default=60.0, help="measured seconds per config")
    ap.add_argument("--warmup", type=float, default=5.0, help="uncounted seconds first")
    ap.add_argument("--clients", type=int, default=16, help="concurrent closed-loop clients")
    ap.add_argument(
        "--configs",
        default=",".join(DEFAULT_CONFIGS),
        help="comma-separated subset of " + ", ".join(c.name for c in CONFIGS),
    )
    ap.add_argument(
        "--runs-dir",
        type=Path,
        default=None,
        help="paths.runs_dir of the servers (default: a fresh folder, so the first start exports)",
    )
    ap.add_argument(
        "--int8",
        type=Path,
        default=None,
        help="int8 ONNX file for the int8 configurations (default: best.int8.onnx beside "
        "--checkpoint, written by `ctscan export --int8`)",
    )
    ap.add_argument(
        "--set",
        dest="sets",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a settings override for every server (e.g. serve.max_batch_size=4); repeatable",
    )
    ap.add_argument(
        "--batch-sizes",
        type=lambda text: [int(n) for n in text.split(",")],
        default=[],
        help="comma-separated serve.max_batch_size values: each configuration once per value "
        "(named CONFIG-bN), the values taking turns",
    )
    ap.add_argument(
        "--repeats", type=int, default=1, help="the whole list of configurations this many times"
    )
    ap.add_argument(
        "--onnx",
        type=Path,
        default=None,
        help="float32 ONNX file for openvino-raw-small (default: best.onnx beside --checkpoint, "
        "written by `ctscan export` with openvino installed)",
    )
    ap.add_argument("--note", default="", help="a line kept in the JSON (e.g. what else ran)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/serve_load.json"))
    args = ap.parse_args()

    wanted = args.configs.split(",")
    configs = [c for c in CONFIGS if c.name in wanted]
    if len(configs) != len(wanted):
        ap.error(f"--configs: use names from {[c.name for c in CONFIGS]}, got {wanted}")
    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        ap.error(f"no PNG/JPEG under {args.images}: run `make data`, or pass --images")
    int8 = args.int8 or args.checkpoint.with_name("best.int8.onnx")
    if not int8.is_file():
        asked = args.configs != ",".join(DEFAULT_CONFIGS) and any(c.int8 for c in configs)
        if args.int8 is not None or asked:
            ap.error(f"--int8 {int8} does not exist: run `ctscan export --int8` first")
        print(f"skipping the int8 configurations: no {int8}", file=sys.stderr)
        configs = [c for c in configs if not c.int8]
    if args.batch_sizes:
        configs = [
            dataclasses.replace(
                c, name=f"{c.name}-b{n}", sets=(*c.sets, f"serve.max_batch_size={n}")
            )
            for n in args.batch_sizes
            for c in configs
        ]
    configs = configs * args.repeats
    onnx = args.onnx or args.checkpoint.with_name("best.onnx")
    if any(c.onnx for c in configs) and not onnx.is_file():
        ap.error(f"--onnx {onnx} does not exist: run `ctscan export` first")
    checkpoint = describe_checkpoint(args.checkpoint)
    bodies = {False: multipart_bodies(images), True: raw_bodies(images)}
    small_same = None
    if any(c.small for c in configs):
        if checkpoint["resize"] != "pad":
            ap.error(f"-small configurations shrink for resize 'pad', not {checkpoint['resize']}")
        small, small_types, small_same = small_bodies(images, checkpoint["image_size"])
        bodies["small"] = (small, small_types)

    rows: list[dict[str, Any]] = []
    cold: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ctscan-serve-load-") as tmp:
        runs_dir = args.runs_dir or Path(tmp) / "runs"  # empty: the first ONNX start exports
        for config in configs:
            port = free_port()
            log = Path(tmp) / f"{config.name}.log"
            cached_before = any((runs_dir / "serve-cache").glob("*.onnx"))
            proc, startup = start_server(
                int8 if config.int8 else onnx if config.onnx else args.checkpoint,
                port=port,
                runs_dir=runs_dir,
                backend=config.backend,
                batching=config.batching,
                log=log,
                sets=(*config.sets, *args.sets),
            )
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/ready", timeout=10).json()["model"]
                served = " ".join(str(ready.get(k)) for k in ("backend", "format", "precision"))
                print(
                    f"{config.name}: ready in {startup:.1f} s ({served}), loading...",
                    file=sys.stderr,
                )
                row = measure(
                    f"http://127.0.0.1:{port}",
                    proc.pid,
                    *bodies["small" if config.small else config.raw],
                    clients=args.clients,
                    seconds=args.seconds,
                    warmup=args.warmup,
                )
            finally:
                stop_server(proc)
            if config.int8 or config.onnx:
                what = f"the {'int8' if config.int8 else 'float32'} .onnx file ({config.backend})"
            elif config.backend == "torch":
                what = "checkpoint on the torch backend (no export)"
            elif cached_before:
                what = "checkpoint, ONNX export found in the cache"
            else:
                what = "checkpoint, first start: export to ONNX + parity check + cache"
            cold.append({"what": what, "configuration": config.name, "seconds": round(startup, 2)})
            rows.append(
                {
                    "name": config.name,
                    **vars(config),
                    "served": served,
                    "startup_s": round(startup, 2),
                }
                | row
            )
        cached = sorted((runs_dir / "serve-cache").glob("*.onnx"))
        if cached:
            port = free_port()
            proc, startup = start_server(
                cached[0],
                port=port,
                runs_dir=runs_dir,
                backend="onnx",
                batching=True,
                log=Path(tmp) / "onnx-file.log",
            )
            stop_server(proc)
            cold.append(
                {"what": "the exported .onnx file (ONNX only)", "seconds": round(startup, 2)}
            )

    flags = cpu_flags()
    kind = next((k for k in TARGETS if k in flags), "avx2")
    target_rps, target_p99 = TARGETS[kind]
    best = max(rows, key=lambda r: r["requests_per_s"], default=None)
    met = best is not None and bool(
        best["requests_per_s"] >= target_rps
        and best["latency_ms"]["p99"] is not None
        and best["latency_ms"]["p99"] <= target_p99
        and best["errors"] == 0
    )
    report = {
        "bench": "serve_load",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu": cpu_name(),
            "cpu_flags": flags,
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "client": {
            "tool": "asyncio + httpx (one process, closed loop; bodies built once)",
            "clients": args.clients,
            "seconds": args.seconds,
            "warmup_s": args.warmup,
            "images": len(images),
            "images_from": str(args.images),
            "route": "POST /predict (field file, or the raw body where raw is true)",
            "small": "where small is true, each body is the slice in gray with its long side "
            "shrunk to the model's input (small_png, done once before the load, as the web "
            "page does in the browser)",
            "small_pixels_identical": small_same,
        },
        "server": "python -m ctscan serve CKPT --backend B --set serve.batching=X [--set what "
        "`sets` lists], 1 worker, default serve settings otherwise (max_batch_size 8, "
        "max_wait_ms 0, queue_size 256)",
        "checkpoint": checkpoint,
        "int8": str(int8) if any(c.int8 for c in configs) else None,
        "onnx": str(onnx) if any(c.onnx for c in configs) else None,
        "note": args.note,
        "configurations": rows,
        "cold_start": cold,
        "target": {
            "cpu_kind": kind,
            "requests_per_s": target_rps,
            "p99_ms": target_p99,
            "best_configuration": best["name"] if best else None,
            "met": met if best is not None else None,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = args.out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(render(report))
    print(f"\nwritten: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

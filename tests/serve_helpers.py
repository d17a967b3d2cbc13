"""Shared pieces of the service tests: a small trained model, the real server in a subprocess.

    with live_server(model, runs_dir=..., overrides={"serve.batching": "false"}) as server:
        server.client().post("/predict", files={"file": ("a.png", png)})

`live_server` starts `python -m ctscan serve MODEL --host 127.0.0.1 --port <free port>` with a
clean environment (no CTSCAN_ / MLFLOW_ variables but those given), waits for /ready, and stops
the process by its PID in a `finally` (SIGTERM, then SIGKILL): nothing is left running. The
server's output goes to a log file that failures quote.

`serve_model` (a session fixture; import it into a test module) is cnn_gap trained one epoch at
32 px on the synthetic store, plus its ONNX export, built once per test session.
"""

from __future__ import annotations

import io
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.processes import clean_env

START_TIMEOUT_S = 120.0  # two shared cores: the first start exports to ONNX
STOP_TIMEOUT_S = 40.0
IMAGE_SIZE = 32
HEALTH_ROUTES = ("/health", "/ready", "/v2/health/live", "/v2/health/ready")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_command(
    model: str | Path,
    port: int,
    *,
    overrides: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
) -> list[str]:
    """The `ctscan serve` command line (overrides are TOML values: strings quoted)."""
    command = [sys.executable, "-m", "ctscan", "serve", str(model)]
    command += ["--host", "127.0.0.1", "--port", str(port), *args]
    for key, value in (overrides or {}).items():
        command += ["--set", f"{key}={value}"]
    return command


def toml_str(value: str | Path) -> str:
    """A string as a TOML value for --set."""
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class LiveServer:
    """A running `ctscan serve` process."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    token: str | None = None

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def headers(self, token: str | None = None) -> dict[str, str]:
        """The Authorization header for `token` (default: the server's own token)."""
        token = token if token is not None else self.token
        return {"Authorization": f"Bearer {token}"} if token else {}

    def client(self, *, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        """An httpx client on the server's URL, with the bearer token if the server has one."""
        return httpx.Client(base_url=self.url, headers=self.headers(token), timeout=timeout)

    def output(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def terminate(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to `timeout` s, then SIGKILL; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return int(self.proc.returncode)


def wait_ready(
    proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = START_TIMEOUT_S
) -> None:
    """Poll /ready until 200; fail the test with the server's log if it exits or never is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ctscan serve exited with {proc.returncode}:\n{_tail(log)}")
        try:
            if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    pytest.fail(f"ctscan serve not ready after {timeout} s:\n{_tail(log)}")


def _tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


@contextmanager
def live_server(
    model: str | Path,
    *,
    runs_dir: Path,
    overrides: Mapping[str, str] | None = None,
    args: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    token: str | None = None,
    log: Path | None = None,
) -> Iterator[LiveServer]:
    """The real server on a free port of 127.0.0.1, ready; stopped by its PID when done.

    `token` is only what the client sends: give the server its token through `overrides`
    (serve.token) or `env` (CTSCAN_SERVE__TOKEN). The server runs in `runs_dir` (its cwd), with
    paths.runs_dir there (the ONNX export cache) and paths.processed_dir a missing folder (no
    drift reference) unless `overrides` say otherwise.
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    settings = {
        "paths.runs_dir": toml_str(runs_dir),
        "paths.processed_dir": toml_str(runs_dir / "no-store"),
        "train.threads": "1",
        **(overrides or {}),
    }
    log = log or runs_dir / f"serve-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            serve_command(model, port, overrides=settings, args=args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(env),
            cwd=runs_dir,
        )
    server = LiveServer(proc=proc, url=f"http://127.0.0.1:{port}", log=log, token=token)
    try:
        wait_ready(proc, server.url, log)
        yield server
    finally:
        server.terminate()


class RestartingServer:
    """A module's shared server, started again if a test stopped it (the SIGTERM test does).

    `get()` answers the running server, or starts a new one through `start` (a callable that
    returns a `live_server(...)` context manager); `close()` stops whatever is running.
    """

    def __init__(self, start: Callable[[], AbstractContextManager[LiveServer]]) -> None:
        self._start = start
        self._stack = ExitStack()
        self._server: LiveServer | None = None

    def get(self) -> LiveServer:
        """The running server (started now if there is none, or it has exited)."""
        if self._server is None or self._server.proc.poll() is not None:
            self._server = self._stack.enter_context(self._start())
        return self._server

    def close(self) -> None:
        """Stop every server this started."""
        self._stack.close()


# ---- inputs ----------------------------------------------------------------------------------


def png_bytes(image: np.ndarray) -> bytes:
    """A gray (H, W) uint8 image as PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG")
    return buf.getvalue()


def sample_images(n: int, size: int = IMAGE_SIZE, seed: int = 0) -> list[np.ndarray]:
    """`n` gray images like the synthetic store's: a bright square in a quadrant over noise."""
    rng = np.random.default_rng(seed)
    out = []
    half = size // 2
    for i in range(n):
        img = rng.integers(0, 60, (size, size), dtype=np.uint8)
        r, c = divmod(i % 4, 2)
        img[r * half : r * half + half // 2, c * half : c * half + half // 2] = 220
        out.append(img)
    return out


def noise_png(n_bytes: int, seed: int = 0) -> bytes:
    """A valid PNG of random pixels at least `n_bytes` long (noise does not compress)."""
    side = int(np.ceil(np.sqrt(n_bytes))) + 8
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side), dtype=np.uint8)
    data = png_bytes(pixels)
    assert len(data) >= n_bytes
    return data


def metric_samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus text -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
    return out


def metric(
    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """One sample's value (0.0 when absent)."""
    return float(samples.get((name, frozenset(labels.items())), 0.0))


# ---- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeModel:
    """A small trained checkpoint, its ONNX export and a runs folder holding the export cache."""

    checkpoint: Path
    onnx: Path
    runs_dir: Path
    store: Path


def build_serve_model(root: Path) -> ServeModel:
    """cnn_gap trained 1 epoch at 32 px on the synthetic store, exported to ONNX (cached)."""
    from ctscan.engine.train import run_training
    from ctscan.ops.export import cached_onnx
    from tests.unit.conftest_store import engine_settings, write_synthetic_store

    runs = root / "runs"
    checkpoint = root / "run" / "best.pt"
    store = root / "processed"
    settings = engine_settings(
        store, runs, IMAGE_SIZE, **{"train.epochs": 1, "train.evaluate_test": "false"}
    )
    if not checkpoint.is_file():
        write_synthetic_store(store, size=IMAGE_SIZE)
        run_training(settings, out_dir=checkpoint.parent)
    onnx = cached_onnx(checkpoint, settings)  # the file `ctscan serve` finds in its cache
    return ServeModel(checkpoint=checkpoint, onnx=onnx, runs_dir=runs, store=store)


@pytest.fixture(scope="session", name="serve_model")
def serve_model_fixture(tmp_path_factory: pytest.TempPathFactory) -> ServeModel:
    """The session's small served model (built once, shared by every serve test module)."""
    return build_serve_model(tmp_path_factory.getbasetemp() / "serve-model")

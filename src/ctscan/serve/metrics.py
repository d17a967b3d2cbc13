"""Prometheus metrics of one server process: requests, latency, predictions, batches, model,
and the time budget of a request: wall and thread-CPU seconds per stage (`STAGES`)."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from starlette.routing import Match

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
# A request's way through /predict (monitor: metrics and the drift window); bytes_in and
# queue_wait wait on others: wall clock only.
STAGES = ("bytes_in", "multipart", "decode", "resize", "queue_wait", "model", "monitor", "json_out")
WALL_ONLY = ("bytes_in", "queue_wait")


class Metrics:
    """The service's metrics in their own registry (one per app, so tests can run several)."""

    def __init__(self, model: dict[str, str]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, Info, Summary

        self.registry = r = CollectorRegistry()

        def histogram(name: str, text: str, buckets: Sequence[float], *labels: str) -> Any:
            return Histogram(name, text, labels, buckets=buckets, registry=r)

        self.requests = Counter(
            "ctscan_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = histogram(
            "ctscan_request_latency_seconds", "time to answer, by route", LATENCY_BUCKETS, "route"
        )
        self.predictions = Counter(
            "ctscan_predictions", "predictions by class", ["label"], registry=r
        )
        self.confidence = histogram(
            "ctscan_prediction_confidence", "probability of the predicted class", CONFIDENCE_BUCKETS
        )
        self.batch_size = histogram("ctscan_batch_size", "images per model call", BATCH_BUCKETS)
        self.model_seconds = histogram(
            "ctscan_model_call_seconds", "time of one model call", LATENCY_BUCKETS
        )
        stage = Summary(
            "ctscan_stage_seconds",
            "seconds per image in each stage of a request (clock: wall, or cpu of the threads "
            "doing the work; model: the batch's wall, and its cpu shared by its images)",
            ["stage", "clock"],
            registry=r,
        )
        self._stages = {
            (name, clock): stage.labels(stage=name, clock=clock)
            for name in STAGES
            for clock in ("wall", "cpu")
            if clock == "wall" or name not in WALL_ONLY
        }
        Info("ctscan_model", "the model served", registry=r).info(model)

    def count(self, route: str, status: int, seconds: float) -> None:
        """One answered request."""
        self.requests.labels(route=route, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def observe_stage(self, stage: str, wall: float, cpu: float | None = None) -> None:
        """One image through one stage: its wall seconds and, where measured, CPU seconds."""
        self._stages[stage, "wall"].observe(wall)
        if cpu is not None:
            self._stages[stage, "cpu"].observe(cpu)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a block that does not await: wall and this thread's CPU."""
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            self.observe_stage(name, time.perf_counter() - wall, time.thread_time() - cpu)

    def observe_batch(self, waits: Sequence[float], sizes: Sequence[int], wall: float, cpu: float):
        """One model call: each request's queue wait and image count, the call's wall and CPU."""
        images = sum(sizes)
        self.batch_size.observe(images)
        self.model_seconds.observe(wall)
        for wait, size in zip(waits, sizes, strict=True):
            for _ in range(size):
                self.observe_stage("queue_wait", wait)
                self.observe_stage("model", wall, cpu / images)

    def observe_prediction(self, label: str, confidence: float) -> None:
        """One predicted image."""
        self.predictions.labels(label=label).inc()
        self.confidence.observe(confidence)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def model_cpu_clock() -> Callable[[], float]:
    """CPU seconds of the calling thread plus the threads Python did not start (ONNX Runtime's
    and torch's pools: call after the model's first run). Linux: clock id `(~tid << 3) | 6`."""
    python = {t.native_id for t in threading.enumerate()}
    try:
        tids = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        tids = []
    clocks = [(~tid << 3) | 6 for tid in tids if tid not in python]

    def clock() -> float:
        total = time.thread_time()
        for clock_id in clocks:
            with contextlib.suppress(OSError):  # that thread has ended
                total += time.clock_gettime(clock_id)
        return total

    return clock


def route_label(scope: dict, routers: Sequence[Any]) -> str:
    """The route template a request went to (bounded label values for the metrics)."""
    route = scope.get("route")
    if getattr(route, "path", None):
        return str(route.path)
    # Routes that are not APIRoutes (docs, static files) and requests answered before routing
    # (413 from the body limit): match them again; a wrong method is a partial match. The
    # routers' own routes, not the app's: FastAPI includes a router as one opaque entry.
    partial = None
    routes = [*scope["app"].router.routes, *(r for router in routers for r in router.routes)]
    for candidate in (route for route in routes if getattr(route, "path", None)):
        match, _ = candidate.matches(scope)
        if match is Match.FULL:
            return str(candidate.path)
        if match is Match.PARTIAL and partial is None:
            partial = str(candidate.path)
    return partial or "unmatched"


class RequestTiming:
    """ASGI middleware: every HTTP request counted by route and status, with its latency (plain
    ASGI: Starlette's BaseHTTPMiddleware costs a task group and streams per request)."""

    def __init__(self, app: Any, metrics: Metrics, routers: Sequence[Any]) -> None:
        self.app, self.metrics, self.routers = app, metrics, routers

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500  # a bug that raises before answering: answered 500 by the handler outside

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            label = route_label(scope, self.routers)
            self.metrics.count(label, status, time.perf_counter() - start)

"""Prometheus metrics of one server process: requests, latency, predictions, batches, model."""

from __future__ import annotations

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
CONFIDENCE_BUCKETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The service's metrics in their own registry (one per app, so tests can run several)."""

    def __init__(self, model: dict[str, str]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram, Info

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ctscan_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "ctscan_request_latency_seconds",
            "time to answer, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.predictions = Counter(
            "ctscan_predictions", "predictions by class", ["label"], registry=r
        )
        self.confidence = Histogram(
            "ctscan_prediction_confidence",
            "probability of the predicted class",
            buckets=CONFIDENCE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "ctscan_batch_size", "images per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.model_seconds = Histogram(
            "ctscan_model_call_seconds",
            "time of one model call",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        Info("ctscan_model", "the model served", registry=r).info(model)

    def count(self, route: str, status: int, seconds: float | None = None) -> None:
        """One answered request."""
        self.requests.labels(route=route, status=str(status)).inc()
        if seconds is not None:
            self.latency.labels(route=route).observe(seconds)

    def observe_batch(self, images: int, seconds: float) -> None:
        """One model call of `images` images."""
        self.batch_size.observe(images)
        self.model_seconds.observe(seconds)

    def observe_prediction(self, label: str, confidence: float) -> None:
        """One predicted image."""
        self.predictions.labels(label=label).inc()
        self.confidence.observe(confidence)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

"""`ctscan serve`: open the model once, pick the backend, start uvicorn (1 or N workers).

Backend `auto` (`ops.backends.open_model`): a checkpoint is served by ONNX Runtime from its
cached ONNX export, keeping the PyTorch model for /explain; an ONNX file runs on ONNX Runtime,
an MLflow URI on torch; `openvino` runs the ONNX file or the cached export on OpenVINO. With N
workers every worker process loads the model itself (uvicorn's multiprocess mode); the parent
exports first, so the workers find the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ctscan.data.reference import CONFIDENCE_FILE, check_reference
from ctscan.data.store import load_store
from ctscan.errors import CtscanError
from ctscan.inference.predictor import MLFLOW_SCHEMES, Predictor, open_predictor
from ctscan.jobs import forget_stops
from ctscan.ops.backends import open_model
from ctscan.serve.app import Service, create_app
from ctscan.serve.metrics import Metrics
from ctscan.settings import Settings

log = logging.getLogger("ctscan.serve")
ENV_ARGS = "_CTSCAN_SERVE_ARGS"  # how the parent hands the model and settings to its workers


def open_models(model: str, settings: Any, backend: str) -> tuple[Predictor, Predictor | None]:
    """(the predictor that answers, a torch predictor for Grad-CAM or None)."""
    predictor = open_model(model, settings, backend)
    if predictor.torch_model is not None:
        return predictor, predictor
    if model.startswith(MLFLOW_SCHEMES) or model.lower().endswith(".onnx"):
        return predictor, None
    return predictor, open_predictor(model, settings=settings, backend="torch")


def read_confidence_reference(path: Path, temperature: float) -> list[float] | None:
    """The confidences in reference_confidence.json if computed at `temperature`, else None."""
    try:
        saved = json.loads(path.read_text())
        confidence = [float(value) for value in saved["confidence"]]
        reference_t = float(saved.get("temperature", 1.0))  # files from before: T = 1
        if not confidence or not all(map(math.isfinite, confidence)):
            raise ValueError("no confidences, or one that is not a finite number")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("confidence drift test off: %s cannot be used (%s)", path, exc)
        return None
    if not math.isclose(reference_t, temperature, rel_tol=1e-6):
        why = f"holds confidences at temperature {reference_t:g}, the model shows them at"
        fix = "`ctscan calibrate` on the model rewrites the file"
        log.warning("confidence drift test off: %s %s %g (%s)", path, why, temperature, fix)
        return None
    return confidence


def _drift_features(beside: Path | None, settings: Any, spec: Any) -> tuple[dict | None, str]:
    """The model's feature reference, or None and why: beside the model, else from the processed
    store when its preprocessing equals the model's (how ONNX files and MLflow models find one)."""
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError, CtscanError):
        features = json.loads(beside.read_text())["features"] if beside else None
        if features is not None and check_reference(features)["image_size"] == spec.image_size:
            return features, ""
    store_dir = settings.paths.processed_dir
    with contextlib.suppress(CtscanError, OSError):
        store = load_store(store_dir, verify=False)
        if store.spec == spec and (features := store.reference()) is not None:
            return features, ""
    where = f"in '{beside}' (`features`) nor " if beside else ""
    return None, (
        f"no training reference {where}in a processed store at '{store_dir}' built with the "
        "model's preprocessing; retrain or `ctscan calibrate` the model to write one beside it"
    )


def _monitor(predictor: Predictor, model: str, settings: Any) -> tuple[Any, str]:
    """A drift monitor fed by the model's training reference, or None and why not."""
    try:
        from ctscan.serve.monitoring import DriftMonitor
    except ImportError as exc:  # scipy
        return None, f"the drift monitor cannot run: {exc}"
    beside = None if model.startswith(MLFLOW_SCHEMES) else Path(model).parent / CONFIDENCE_FILE
    features, why_not = _drift_features(beside, settings, predictor.spec)
    if features is None:
        return None, why_not
    confidence = None
    if beside is not None and beside.is_file():
        confidence = read_confidence_reference(beside, predictor.info.temperature)
    serve = settings.serve
    window, min_samples = serve.drift_window, serve.drift_min_samples
    return DriftMonitor(
        features, window=window, min_samples=min_samples, confidence_reference=confidence
    ), ""


def build_service(model: str, settings: Any) -> Service:
    """Everything a server process needs, opened once: a clear CtscanError if MODEL is bad."""
    predictor, explainer = open_models(model, settings, settings.serve.backend)
    metrics = Metrics({k: str(v) for k, v in predictor.info.to_dict().items()})
    monitor, drift_off = _monitor(predictor, str(model), settings)
    if monitor is not None:
        monitor.register_metrics(metrics.registry)
    else:
        log.warning("drift monitoring is off: %s", drift_off)
    return Service(predictor, settings, explainer, metrics, monitor, drift_off=drift_off)


def app_from_env() -> Any:
    """uvicorn's factory in each worker process: the model and settings the parent resolved."""
    args = json.loads(os.environ[ENV_ARGS])
    return create_app(build_service(args["model"], Settings.model_validate(args["settings"])))


def run_server(model: str, settings: Any) -> None:
    """Serve until SIGTERM / Ctrl-C (in-flight requests finish within serve.shutdown_timeout_s)."""
    import uvicorn

    serve = settings.serve
    service = build_service(model, settings)  # fails here, before binding, on a bad MODEL
    common: dict[str, Any] = {"host": serve.host, "port": serve.port, "log_level": "info"}
    common["timeout_graceful_shutdown"] = serve.shutdown_timeout_s
    if serve.workers == 1:
        uvicorn.run(create_app(service), **common)
    else:
        args = {"model": model, "settings": settings.model_dump(mode="json")}
        os.environ[ENV_ARGS] = json.dumps(args)
        del service
        uvicorn.run(
            "ctscan.serve.server:app_from_env", factory=True, workers=serve.workers, **common
        )
    # uvicorn shut down gracefully on the SIGTERM / Ctrl-C, then re-raised it and caught it
    # itself: the stop has been acted on, and serving ends with exit 0.
    forget_stops()

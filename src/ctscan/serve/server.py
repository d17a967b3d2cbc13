"""`ctscan serve`: open the model once, pick the backend, start uvicorn (1 or N workers).

Backend `auto`: an ONNX file runs on ONNX Runtime; a checkpoint is exported to ONNX once (cached
by the checkpoint's sha256 under `paths.runs_dir/serve-cache/`, checked against the eager model
on start-up) and served by ONNX Runtime, keeping the PyTorch model for /explain; an MLflow URI
runs on torch. With N workers every worker process loads the model itself (uvicorn's
multiprocess mode); the parent exports first, so the workers find the cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from ctscan.data.reference import CONFIDENCE_FILE
from ctscan.errors import CheckpointError, CtscanError
from ctscan.inference.predictor import MLFLOW_SCHEMES, Predictor, open_predictor
from ctscan.jobs import forget_stops
from ctscan.serve.app import Service, create_app
from ctscan.serve.metrics import Metrics

log = logging.getLogger("ctscan.serve")
ENV_ARGS = "_CTSCAN_SERVE_ARGS"  # how the parent hands the model and settings to its workers
PARITY_ATOL = 1e-4


def _cached_onnx(checkpoint: Path, settings: Any) -> Path:
    """The checkpoint exported to ONNX, from the cache or written to it now."""
    from ctscan.engine.checkpoint import load_model, read_checkpoint
    from ctscan.files import file_sha256, folder_problem
    from ctscan.ops.export import export_metadata, require_onnx_tools, write_onnx

    sha = file_sha256(checkpoint)
    cache_dir = Path(settings.paths.runs_dir) / "serve-cache"
    if folder_problem(cache_dir) is not None:  # a read-only runs_dir: export for this run only
        cache_dir = Path(tempfile.mkdtemp(prefix="ctscan-serve-"))
    target = cache_dir / f"{sha[:24]}.onnx"
    if target.is_file():
        return target
    require_onnx_tools()
    ckpt = read_checkpoint(checkpoint)
    meta = export_metadata(ckpt, checkpoint_sha256=sha, fmt="onnx")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=cache_dir)
    os.close(fd)
    try:
        write_onnx(load_model(ckpt).deployable(), Path(tmp), size=ckpt.spec.image_size, meta=meta)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _agree(onnx: Predictor, torch_: Predictor) -> bool:
    """The exported model answers as the eager one on random images (start-up check)."""
    size = onnx.spec.image_size
    images = np.random.default_rng(0).integers(0, 256, (4, 1, size, size), dtype=np.uint8)
    return bool(np.abs(onnx.logits(images) - torch_.logits(images)).max() <= PARITY_ATOL)


def _check_model_path(text: str) -> None:
    """A MODEL path that is missing or a folder fails at once, before the heavy imports."""
    if text.startswith(MLFLOW_SCHEMES):
        return
    path = Path(text)
    if path.is_dir():
        raise CheckpointError(
            f"MODEL '{path}' is a folder, not a model file.",
            "pass a checkpoint (best.pt), an ONNX file (.onnx) or an MLflow model URI.",
        )
    if not path.is_file():
        raise CheckpointError(
            f"MODEL '{path}' does not exist.",
            "pass best.pt from a run folder (ctscan train), an ONNX file (ctscan export) or an "
            "MLflow model URI (models:/ctscan-classifier@champion).",
        )


def open_models(model: str, settings: Any, backend: str) -> tuple[Predictor, Predictor | None]:
    """(the predictor that answers, a torch predictor for Grad-CAM or None)."""
    text = str(model)
    _check_model_path(text)
    if text.startswith(MLFLOW_SCHEMES) or Path(text).suffix.lower() == ".onnx":
        predictor = open_predictor(text, settings=settings, backend=None)
        if backend != "auto" and backend != predictor.info.backend:
            raise CtscanError(
                f"'{text}' runs on {predictor.info.backend}, not {backend}.",
                f"use --backend {predictor.info.backend} or auto.",
            )
        return predictor, (predictor if predictor.torch_model is not None else None)
    path = Path(text)
    eager = open_predictor(path, settings=settings, backend="torch")
    if backend == "torch":
        return eager, eager
    try:
        onnx = open_predictor(_cached_onnx(path, settings), settings=settings, backend="onnx")
    except CtscanError as exc:
        if backend == "onnx":
            raise
        log.warning("serving with torch: ONNX export is not available (%s)", exc.message)
        return eager, eager
    if not _agree(onnx, eager):
        if backend == "onnx":
            raise CtscanError(
                f"the ONNX export of '{path}' does not match the PyTorch model.",
                "serve with --backend torch, and report this.",
            )
        log.warning("serving with torch: the ONNX export differs from the eager model")
        return eager, eager
    return onnx, eager


def read_confidence_reference(path: Path, temperature: float) -> list[float] | None:
    """The train confidences of reference_confidence.json if computed at `temperature`, else None.

    The drift test compares the confidence the server shows (softmax(logits / T)) with the one
    on the train images: a reference written for another T (or unreadable) is not used.
    """
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
        log.warning(
            "confidence drift test off: %s holds confidences at temperature %g, the model "
            "shows them at %g (`ctscan calibrate` on the model rewrites the file)",
            path,
            reference_t,
            temperature,
        )
        return None
    return confidence


def _drift_features(model: str, settings: Any, spec: Any) -> tuple[dict | None, str]:
    """The feature reference of the model's training data, or None and where none was found.

    First beside the model (reference_confidence.json's `features`: it travels with the run
    folder, a fold, an ensemble), then the processed store at paths.processed_dir when its
    preprocessing equals the model's (how ONNX files and MLflow models find one).
    """
    from ctscan.data.reference import check_reference
    from ctscan.data.store import load_store

    beside = None if model.startswith(MLFLOW_SCHEMES) else Path(model).parent / CONFIDENCE_FILE
    try:
        features = json.loads(beside.read_text())["features"] if beside else None
        if features is not None and check_reference(features)["image_size"] == spec.image_size:
            return features, ""
    except (OSError, ValueError, KeyError, TypeError, CtscanError):
        pass
    store_dir = settings.paths.processed_dir
    try:
        store = load_store(store_dir, verify=False)
        if store.spec == spec and (features := store.reference()) is not None:
            return features, ""
    except (CtscanError, OSError):
        pass
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
    features, why_not = _drift_features(model, settings, predictor.spec)
    if features is None:
        return None, why_not
    confidence = None
    beside = Path(model).parent / CONFIDENCE_FILE
    if not model.startswith(MLFLOW_SCHEMES) and beside.is_file():
        confidence = read_confidence_reference(beside, predictor.info.temperature)
    serve = settings.serve
    monitor = DriftMonitor(
        features,
        window=serve.drift_window,
        min_samples=serve.drift_min_samples,
        confidence_reference=confidence,
    )
    return monitor, ""


def build_service(model: str, settings: Any) -> Service:
    """Everything a server process needs, opened once: a clear CtscanError if MODEL is bad."""
    predictor, explainer = open_models(model, settings, settings.serve.backend)
    metrics = Metrics({k: str(v) for k, v in predictor.info.to_dict().items()})
    monitor, drift_off = _monitor(predictor, str(model), settings)
    if monitor is not None:
        monitor.register_metrics(metrics.registry)
    else:
        log.warning("drift monitoring is off: %s", drift_off)
    return Service(
        predictor=predictor,
        settings=settings,
        explainer=explainer,
        metrics=metrics,
        monitor=monitor,
        drift_off=drift_off,
    )


def app_from_env() -> Any:
    """uvicorn's factory in each worker process: the model and settings the parent resolved."""
    from ctscan.settings import Settings

    args = json.loads(os.environ[ENV_ARGS])
    settings = Settings.model_validate(args["settings"])
    return create_app(build_service(args["model"], settings))


def run_server(model: str, settings: Any) -> None:
    """Serve until SIGTERM / Ctrl-C (in-flight requests finish within serve.shutdown_timeout_s)."""
    import uvicorn

    serve = settings.serve
    service = build_service(model, settings)  # fails here, before binding, on a bad MODEL
    common: dict[str, Any] = {
        "host": serve.host,
        "port": serve.port,
        "timeout_graceful_shutdown": serve.shutdown_timeout_s,
        "log_level": "info",
    }
    if serve.workers == 1:
        uvicorn.run(create_app(service), **common)
    else:
        # Each worker opens the model itself; a checkpoint's ONNX export is in the cache by now.
        os.environ[ENV_ARGS] = json.dumps(
            {"model": model, "settings": settings.model_dump(mode="json")}
        )
        del service
        uvicorn.run(
            "ctscan.serve.server:app_from_env", factory=True, workers=serve.workers, **common
        )
    # uvicorn shut down gracefully on the SIGTERM / Ctrl-C, then re-raised it and caught it
    # itself: the stop has been acted on, and serving ends with exit 0.
    forget_stops()

"""Which runtime answers `ctscan predict` and `ctscan serve`: a checkpoint's cached ONNX export
(`export.cached_onnx`) on ONNX Runtime (or OpenVINO, asked for) unless torch is asked for or that
export cannot be made."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ctscan.errors import CheckpointError, CtscanError
from ctscan.files import model_file
from ctscan.inference.predictor import MLFLOW_SCHEMES, Predictor, import_openvino, open_predictor
from ctscan.ops.export import cached_onnx

BACKENDS = ("auto", "onnx", "openvino", "torch")
log = logging.getLogger(__name__)


def open_model(model: str | Path, settings: Any, backend: str = "auto") -> Predictor:
    """The Predictor for `model` on `backend`; auto runs a checkpoint on its cached ONNX export,
    on torch (with a warning) when that cannot be made; openvino runs that export, or an ONNX
    file, on OpenVINO."""
    if backend not in BACKENDS:
        raise CtscanError(
            f"backend '{backend}' is not one of {', '.join(BACKENDS)}.", "use --backend auto."
        )
    text, path = str(model), Path(model)
    uri = text.startswith(MLFLOW_SCHEMES)
    if not uri:  # before the heavy imports
        fix = "pass best.pt from a run folder (ctscan train), an ONNX file (ctscan export) or an"
        model_file(path, "model", f"{fix} MLflow model URI (models:/ctscan-classifier@champion).")
    if backend == "openvino":
        import_openvino()  # a missing extra: before the export
    asked = None if backend == "auto" else backend
    if uri or text.lower().endswith(".onnx") or backend == "torch":
        return open_predictor(text, settings=settings, backend=asked)
    try:
        predictor = open_predictor(cached_onnx(path, settings), settings=settings, backend=asked)
        predictor.info = dataclasses.replace(predictor.info, source=text)  # not the cache file
        return predictor
    except CheckpointError:
        raise  # a file torch cannot read either: its own line, no fallback warning before it
    except CtscanError as exc:
        if backend != "auto":
            raise
        log.warning("running on torch: the ONNX export cannot be used (%s)", exc.message)
    return open_predictor(text, settings=settings, backend="torch")

"""Inference: one Predictor for a checkpoint, an ONNX file or an MLflow model; DICOM; Grad-CAM.

`predict`, `serve`, `evaluate`'s sibling paths and the export parity check all get their answers
from `Predictor` (see predictor.py). Heavy or optional imports (onnxruntime, mlflow, pydicom)
happen inside the functions that need them.
"""

from ctscan.inference.predictor import (
    ModelInfo,
    Prediction,
    Predictor,
    open_predictor,
    read_image,
)

__all__ = ["ModelInfo", "Prediction", "Predictor", "open_predictor", "read_image"]

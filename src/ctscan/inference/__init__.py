"""Inference: one Predictor for a checkpoint, an ONNX file or an MLflow model; DICOM; Grad-CAM.

`predict`, `serve` and the export parity check all get their answers from `Predictor`."""

from ctscan.inference.predictor import ModelInfo, Prediction, Predictor, open_predictor, read_image

__all__ = ["ModelInfo", "Prediction", "Predictor", "open_predictor", "read_image"]

"""Grad-CAM heat maps for the registry models, and the overlay PNG that `predict --explain` writes.

    layer = gradcam_layer(model, "resnet18")                  # ctscan.models.GRADCAM_LAYERS
    heat, index = grad_cam(model, x, layer)                  # x: model_input(...) (1, C, S, S)
    png = overlay_png(gray, heat, title="normal 97.1%")      # gray: (S, S) uint8

Grad-CAM (Selvaraju et al., 2017): with A the target layer's activations (K, h, w) and y the
class logit, w_k = mean over (h, w) of dy/dA_k, cam = relu(sum_k w_k A_k), upsampled bilinearly
to the input size and divided by its maximum (a map with no positive evidence stays all zero).

A forward hook and `torch.autograd.grad`, not the `grad-cam` package (it pulls opencv for a
resize and a colour map; its GradCAM gives the same maps to 2e-6 after its min-max rescale).
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from ctscan.data.transforms import model_input
from ctscan.models import gradcam_layer, unwrap
from ctscan.models.ensemble import Ensemble

OVERLAY_MIN_SIDE = 256  # the overlay is upscaled by a whole factor to at least this side
OVERLAY_ALPHA = 0.4  # weight of the colour map over the slice
TITLE_HEIGHT = 24  # the band above the image that holds the title


def grad_cam(
    model: nn.Module, x: torch.Tensor, target_layer: nn.Module, class_index: int | None = None
) -> tuple[np.ndarray, int]:
    """Grad-CAM of one input: the (S, S) float32 heat map in [0, 1] and the class index explained.

    `x`: `model_input`'s (1, C, S, S); modes, `.grad` and hooks are left as they were.
    """
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"grad_cam expects one input of shape (1, C, S, S), got {tuple(x.shape)}.")
    plain = unwrap(model)  # hooks on a compiled model's submodules need the eager module
    captured: list[torch.Tensor] = []
    modes = {module: module.training for module in plain.modules()}
    handle = target_layer.register_forward_hook(lambda _m, _a, output: captured.append(output))
    try:
        plain.eval()
        with torch.inference_mode(False), torch.enable_grad():
            # A fresh leaf that requires grad: the graph reaches the layer even when every
            # parameter is frozen, and an inference-mode tensor from the caller is usable.
            inputs = x.detach().clone().requires_grad_(True)
            logits = plain(inputs)  # (1, num_classes)
            if not captured:
                raise ValueError(
                    f"the target layer {type(target_layer).__name__} did not run in the forward "
                    "pass; pass a layer of this model (ctscan.models.gradcam_layer)."
                )
            activations = captured[-1]  # (1, K, h, w)
            if not isinstance(activations, torch.Tensor) or activations.ndim != 4:
                raise ValueError(
                    "the target layer must output a (1, K, h, w) tensor, got "
                    f"{getattr(activations, 'shape', type(activations).__name__)}."
                )
            num_classes = logits.shape[-1]
            if class_index is None:
                class_index = int(logits[0].argmax())
            elif not 0 <= (class_index := int(class_index)) < num_classes:
                raise ValueError(f"class_index {class_index} is not in 0..{num_classes - 1}.")
            (gradients,) = torch.autograd.grad(logits[0, class_index], activations)  # (1,K,h,w)
        with torch.no_grad():
            weights = gradients.float().mean(dim=(2, 3), keepdim=True)  # (1, K, 1, 1)
            cam = torch.relu((weights * activations.float()).sum(dim=1, keepdim=True))
            cam = nn.functional.interpolate(
                cam, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False
            )[0, 0]  # (S, S)
            cam = torch.nan_to_num(cam, nan=0.0, posinf=0.0, neginf=0.0).clamp_(min=0.0)
            peak = float(cam.max())
            heat = (cam / peak if peak > 0.0 else cam).clamp_(0.0, 1.0).cpu().numpy()
    finally:
        handle.remove()
        for module, training in modes.items():
            module.training = training
    return heat, class_index


def cam_function(
    model: nn.Module, name: str
) -> Callable[[torch.Tensor, int | None], tuple[np.ndarray, int]]:
    """`(x, class_index) -> (heat, class_index)` for a model, or an ensemble (its members' mean)."""
    plain = unwrap(model)
    if not isinstance(plain, Ensemble):
        layer = gradcam_layer(model, name)
        return lambda x, index: grad_cam(model, x, layer, index)
    parts = [(member, gradcam_layer(member.net, member.name)) for member in plain.members]

    def ensemble_cam(x: torch.Tensor, index: int | None) -> tuple[np.ndarray, int]:
        if index is None:
            with torch.no_grad():
                index = int(plain(x)[0].argmax())
        heat = np.mean([grad_cam(member, x, layer, index)[0] for member, layer in parts], axis=0)
        peak = float(heat.max())
        return (heat / peak if peak > 0.0 else heat).astype(np.float32), index

    return ensemble_cam


def cam_heat(predictor: Any, cam: Callable, gray: np.ndarray, index: int | None) -> np.ndarray:
    """The (S, S) heat map of `cam` (from `cam_function`) on one slice of `predictor`'s model."""
    (model, channels), spec = predictor.torch_model, predictor.spec
    x = torch.from_numpy(gray[None, None]).to(next(model.parameters()).device)  # (1, 1, S, S)
    return cam(model_input(x, mean=spec.mean, std=spec.std, channels=channels), index)[0]


def jet(values: np.ndarray) -> np.ndarray:
    """A jet-like colour map: values in [0, 1] (any shape) -> uint8 RGB (..., 3), blue to red."""
    v = np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)[..., None]
    centres = np.array([3.0, 2.0, 1.0], dtype=np.float32)  # red, green, blue peaks at 3/4, 1/2, 1/4
    rgb = np.clip(1.5 - np.abs(4.0 * v - centres), 0.0, 1.0)
    return np.rint(rgb * 255.0).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType
    except (TypeError, ValueError, OSError, ImportError):
        return ImageFont.load_default()


def overlay_png(gray: np.ndarray, heat: np.ndarray, *, title: str) -> bytes:
    """PNG of the (S, S) uint8 slice under the coloured (S, S) heat map, upscaled, with `title`."""
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise ValueError(f"gray must be a (S, S) uint8 array, got {gray.dtype} {gray.shape}.")
    if heat.shape != gray.shape:
        raise ValueError(f"heat {heat.shape} and gray {gray.shape} must have the same shape.")
    base = np.repeat(gray[..., None].astype(np.float32), 3, axis=2)  # (S, S, 3)
    blended = (1.0 - OVERLAY_ALPHA) * base + OVERLAY_ALPHA * jet(heat).astype(np.float32)
    picture = Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8), mode="RGB")
    height, width = gray.shape
    factor = max(1, math.ceil(OVERLAY_MIN_SIDE / min(height, width)))
    picture = picture.resize((width * factor, height * factor), Image.Resampling.BILINEAR)

    canvas = Image.new("RGB", (picture.width, picture.height + TITLE_HEIGHT), (0, 0, 0))
    canvas.paste(picture, (0, TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    font = _font(14)
    top, bottom = draw.textbbox((0, 0), title, font=font)[1::2]
    draw.text((6, (TITLE_HEIGHT - top - bottom) // 2), title, fill=(255, 255, 255), font=font)
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    return buffer.getvalue()

"""Batched augmentation as tensor ops on whatever device the batch lives on.

One affine grid per batch carries rotation, scale, translation and flips; then brightness,
contrast and optional random erasing. No per-image Python, no DataLoader workers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ctscan.settings import AugmentSettings


def _uniform(n: int, low: float, high: float, device: torch.device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def affine_params(n: int, aug: AugmentSettings, device: torch.device) -> torch.Tensor:
    """Random (n, 2, 3) affine matrices in normalised coordinates."""
    angle = _uniform(n, -aug.rotation_deg, aug.rotation_deg, device) * (math.pi / 180.0)
    scale = _uniform(n, aug.scale_min, aug.scale_max, device)
    shift = _uniform(2 * n, -2 * aug.translate, 2 * aug.translate, device).view(n, 2)
    flip_x = torch.where(torch.rand(n, device=device) < aug.hflip, -1.0, 1.0)
    flip_y = torch.where(torch.rand(n, device=device) < aug.vflip, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos * flip_x, -sin * flip_y, shift[:, 0]], dim=1),
            torch.stack([sin * flip_x, cos * flip_y, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    return theta  # (n, 2, 3)


def _erase(x: torch.Tensor, prob: float) -> torch.Tensor:
    """Zero one random rectangle (2-20 % of the area, aspect 0.3-3.3) in a `prob` share."""
    n, _, h, w = x.shape
    device = x.device
    area = _uniform(n, 0.02, 0.2, device) * h * w
    log_ratio = _uniform(n, math.log(0.3), math.log(1 / 0.3), device)
    ratio = torch.exp(log_ratio)
    eh = torch.sqrt(area * ratio).clamp(1, h)
    ew = torch.sqrt(area / ratio).clamp(1, w)
    top = torch.rand(n, device=device) * (h - eh)
    left = torch.rand(n, device=device) * (w - ew)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    inside = (
        (rows >= top.view(n, 1, 1))
        & (rows < (top + eh).view(n, 1, 1))
        & (cols >= left.view(n, 1, 1))
        & (cols < (left + ew).view(n, 1, 1))
    )
    apply = (torch.rand(n, device=device) < prob).view(n, 1, 1)
    return x.masked_fill((inside & apply).unsqueeze(1), 0.0)


def augment(x: torch.Tensor, aug: AugmentSettings) -> torch.Tensor:
    """Randomly transform a float batch (B, C, H, W) in [0, 1]; returns the same shape in [0, 1]."""
    n = x.shape[0]
    if not aug.enabled or n == 0:
        return x
    device = x.device
    theta = affine_params(n, aug, device).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if aug.brightness > 0 or aug.contrast > 0:
        gain = 1.0 + _uniform(n, -aug.contrast, aug.contrast, device).view(n, 1, 1, 1)
        offset = _uniform(n, -aug.brightness, aug.brightness, device).view(n, 1, 1, 1)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * gain + mean + offset).clamp_(0.0, 1.0)
    if aug.erasing > 0:
        x = _erase(x, aug.erasing)
    return x

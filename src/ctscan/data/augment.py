"""Batched augmentation as tensor ops on whatever device the batch lives on.

One affine grid per batch carries rotation, scale, translation and flips; then brightness,
contrast and optional random erasing. No per-image Python, no DataLoader workers.

`mix_batch` adds MixUp (Zhang et al., 2018) and CutMix (Yun et al., 2019) on the model's input:
with probability `mix_prob` a batch is mixed with a shuffled copy of itself, one lambda ~
Beta(alpha, alpha) per batch (as timm's default "batch" mode); with both alphas > 0 each mixed
batch is MixUp or CutMix with equal odds. The loss is then lam * CE(labels) + (1 - lam) *
CE(partner labels), i.e. cross-entropy against the mixed soft target (label smoothing applies
to both terms). CutMix's lambda is the share of the image that stays its own after the box is
clipped to the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
    rows = [cos * flip_x, -sin * flip_y, shift[:, 0], sin * flip_x, cos * flip_y, shift[:, 1]]
    return torch.stack(rows, dim=1).view(n, 2, 3)


def _erase(x: torch.Tensor, prob: float) -> torch.Tensor:
    """Zero one random rectangle (2-20 % of the area, aspect 0.3-3.3) in a `prob` share."""
    n, _, h, w = x.shape
    device = x.device
    area = _uniform(n, 0.02, 0.2, device) * h * w
    ratio = torch.exp(_uniform(n, math.log(0.3), math.log(1 / 0.3), device))
    eh = torch.sqrt(area * ratio).clamp(1, h)
    ew = torch.sqrt(area / ratio).clamp(1, w)
    top = torch.rand(n, device=device) * (h - eh)
    left = torch.rand(n, device=device) * (w - ew)
    rows = torch.arange(h, device=device).view(1, h, 1)
    cols = torch.arange(w, device=device).view(1, 1, w)
    top, left, eh, ew = (t.view(n, 1, 1) for t in (top, left, eh, ew))
    inside = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)
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


@dataclass(frozen=True)
class Mixed:
    """How a batch was mixed: image i holds `lam` of itself and 1 - lam of image `partner[i]`."""

    partner_labels: torch.Tensor  # (B,) the labels of the images mixed in
    lam: float
    kind: str  # "mixup" or "cutmix"


def mix_batch(
    x: torch.Tensor, labels: torch.Tensor, aug: AugmentSettings
) -> tuple[torch.Tensor, Mixed | None]:
    """MixUp / CutMix of a (B, C, H, W) batch on its device; (x, None) when not mixed."""
    n = x.shape[0]
    kinds = [k for k, alpha in (("mixup", aug.mixup_alpha), ("cutmix", aug.cutmix_alpha)) if alpha]
    if not aug.enabled or not kinds or n < 2 or float(torch.rand(())) >= aug.mix_prob:
        return x, None
    kind = kinds[int(torch.randint(len(kinds), ()))]
    alpha = aug.mixup_alpha if kind == "mixup" else aug.cutmix_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    perm = torch.randperm(n, device=x.device)
    if kind == "mixup":
        mixed = x * lam + x[perm] * (1.0 - lam)
    else:
        h, w = x.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(h, ())), int(torch.randint(w, ()))
        top, bottom = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        left, right = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        mixed = x.clone()
        mixed[:, :, top:bottom, left:right] = x[perm, :, top:bottom, left:right]
        lam = 1.0 - (bottom - top) * (right - left) / float(h * w)
    return mixed, Mixed(partner_labels=labels[perm], lam=lam, kind=kind)


def mixed_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mixed: Mixed | None,
    *,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy against the labels, or against the mixed soft target of `mix_batch`."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if mixed is None:
        return loss
    other = F.cross_entropy(logits, mixed.partner_labels, label_smoothing=label_smoothing)
    return loss * mixed.lam + other * (1.0 - mixed.lam)

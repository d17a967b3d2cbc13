"""ResNet-18 (torchvision) with a fresh head, optionally from torchvision's ImageNet weights."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ctscan.models.weights import WeightsUnavailable, load_backbone, read_state_dict

if TYPE_CHECKING:
    import torch
    from torch import nn


def cached_weights_path() -> Path:
    """Where torchvision keeps ResNet18_Weights.IMAGENET1K_V1 (TORCH_HOME/hub/checkpoints/...)."""
    import torch.hub
    from torchvision.models import ResNet18_Weights

    url = ResNet18_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _fix() -> str:
    from torchvision.models import ResNet18_Weights

    return (
        f"on a machine with internet, download {ResNet18_Weights.IMAGENET1K_V1.url} and put it "
        f"in {cached_weights_path().parent}/ (TORCH_HOME/hub/checkpoints), or pass its path as "
        "model.weights_path; or train from scratch with model.pretrained=false."
    )


def imagenet_state_dict(weights_path: Path | None = None, download: bool = True) -> dict:
    """ResNet-18 ImageNet weights: from `weights_path`, torchvision's cache, or a download."""
    if weights_path is not None:
        return read_state_dict(Path(weights_path), _fix())
    cached = cached_weights_path()
    if cached.is_file():
        return read_state_dict(cached, _fix())
    if not download:
        raise WeightsUnavailable(f"no ResNet-18 ImageNet weights at {cached}.", _fix())
    from torchvision.models import ResNet18_Weights

    try:
        return ResNet18_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, timeouts, hash mismatch: all mean "not available here"
        raise WeightsUnavailable(
            f"cannot download ResNet-18 ImageNet weights ({type(exc).__name__}: {exc}).", _fix()
        ) from None


def build_resnet18(
    *,
    num_classes: int = 4,
    pretrained: bool = False,
    weights_path: Path | None = None,
    dropout: float = 0.2,
    download: bool = True,
) -> nn.Module:
    """torchvision resnet18 whose `fc` is Dropout -> Linear(512, num_classes); 3 input channels."""
    import torch
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    if pretrained:
        state: dict[str, torch.Tensor] = imagenet_state_dict(weights_path, download=download)
        source = str(weights_path) if weights_path is not None else "torchvision's ResNet-18"
        load_backbone(model, state, head_prefix="fc.", source=source, fix=_fix())
    model.fc = torch.nn.Sequential(
        torch.nn.Dropout(dropout), torch.nn.Linear(model.fc.in_features, num_classes)
    )
    return model

"""The engine's door to the model registry: settings in, CtscanError out; the deployable model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ctscan import models
from ctscan.data.transforms import PreprocessSpec, model_input
from ctscan.engine.temperature import apply_temperature
from ctscan.errors import CheckpointError, SettingsError
from ctscan.models.weights import fit_problems


def build_model(name: str, **options: Any) -> nn.Module:
    """`ctscan.models.build_model`, its ValueErrors made SettingsErrors (missing weights already
    are CtscanErrors)."""
    try:
        return models.build_model(name, **options)
    except ValueError as exc:
        raise SettingsError(str(exc), "check the [model] section of your settings.") from None


def build(settings: Any, *, image_size: int, num_classes: int) -> nn.Module:
    """A fresh model as the [model] settings say, for a store of `image_size` px."""
    m = settings.model
    pretrained = uses_pretrained(settings)
    return build_model(
        m.name,
        num_classes=num_classes,
        pretrained=pretrained,
        weights_path=m.weights_path if pretrained else None,
        dropout=m.dropout,
        image_size=image_size,
    )


def load_model_state(model: nn.Module, state: dict[str, Any], *, source: Path | str) -> None:
    """Load weights strictly; a checkpoint of another model or shape is a clear error."""
    if problems := fit_problems(model.state_dict(), state):
        raise CheckpointError(
            f"checkpoint '{source}' does not fit this model: {'; '.join(problems)}.",
            "use the model name and image size the checkpoint was trained with.",
        )
    model.load_state_dict(state, strict=True)


def uses_pretrained(settings: Any) -> bool:
    """Whether this run starts from ImageNet weights (pretrained on and the model has them)."""
    return settings.model.pretrained and models.has_pretrained(settings.model.name)


def backbone_frozen(settings: Any, epoch: int) -> bool:
    """A pretrained backbone stays frozen for the first `model.freeze_epochs` epochs."""
    return uses_pretrained(settings) and epoch <= settings.model.freeze_epochs


def freeze_backbone(model: nn.Module, settings: Any, epoch: int) -> None:
    """Freeze the backbone for epoch `epoch` or unfreeze it, all but its `model.frozen_stages`."""
    stages = settings.model.frozen_stages if uses_pretrained(settings) else 0
    always = models.early_parameters(model, settings.model.name, stages)
    models.freeze_backbone(model, backbone_frozen(settings, epoch), always)


class Deployable(nn.Module):
    """(B, 1, S, S) uint8 gray images -> (B, C) float32 logits / temperature.

    Normalisation and the channel repeat run inside, so the MLflow model and the exported files
    need nothing from ctscan but the decode and resize.
    """

    def __init__(
        self, net: nn.Module, spec: PreprocessSpec, channels: int, temperature: float = 1.0
    ) -> None:
        super().__init__()
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.net = net
        self.mean, self.std, self.channels = float(spec.mean), float(spec.std), int(channels)
        self.temperature = float(temperature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = model_input(images, mean=self.mean, std=self.std, channels=self.channels)
        return apply_temperature(self.net(x).float(), self.temperature)


def check_model_name(name: str, source: Path | str) -> str:
    """The checkpoint's model name if this ctscan knows it, else a CheckpointError."""
    if name not in models.MODEL_NAMES:
        raise CheckpointError(
            f"checkpoint '{source}' holds an unknown model '{name}'.",
            f"this ctscan knows {', '.join(models.MODEL_NAMES)}.",
        )
    return name

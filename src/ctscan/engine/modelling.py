"""The engine's door to the model registry: settings in, CtscanError out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ctscan import models
from ctscan.engine.checkpoint import load_model_state
from ctscan.errors import CheckpointError, CtscanError, SettingsError
from ctscan.settings import Settings


def model_channels(name: str) -> int:
    """Input channels the model takes (the gray store is repeated on the device when 3)."""
    return models.input_channels(name)


def _build(name: str, **kwargs: Any) -> torch.nn.Module:
    try:
        return models.build_model(name, **kwargs)
    except models.WeightsUnavailable as exc:
        raise CtscanError(exc.message, exc.fix) from None
    except ValueError as exc:
        raise SettingsError(str(exc), "check the [model] section of your settings.") from None


def build(settings: Settings, *, image_size: int, num_classes: int) -> torch.nn.Module:
    """A fresh model as the [model] settings say, for a store of `image_size` px."""
    m = settings.model
    pretrained = uses_pretrained(settings)
    return _build(
        m.name,
        num_classes=num_classes,
        pretrained=pretrained,
        weights_path=m.weights_path if pretrained else None,
        dropout=m.dropout,
        image_size=image_size,
    )


def build_from_checkpoint(state: dict[str, Any], *, source: Path | str) -> torch.nn.Module:
    """The checkpoint's model with its weights, in eval mode (no pretrained download needed)."""
    name = state["model_name"]
    if name not in models.MODEL_NAMES:
        raise CheckpointError(
            f"checkpoint '{source}' holds an unknown model '{name}'.",
            f"this ctscan knows {', '.join(models.MODEL_NAMES)}.",
        )
    model = _build(
        name,
        num_classes=len(state["class_names"]),
        pretrained=False,
        dropout=state["settings"].get("model", {}).get("dropout", 0.2),
        image_size=state["preprocess"]["image_size"],
    )
    load_model_state(model, state["model_state"], source=source)
    return model.eval()


def uses_pretrained(settings: Settings) -> bool:
    """Whether this run starts from ImageNet weights (pretrained on and the model has them)."""
    return settings.model.pretrained and models.has_pretrained(settings.model.name)


def backbone_frozen(settings: Settings, epoch: int) -> bool:
    """A pretrained backbone stays frozen for the first `model.freeze_epochs` epochs."""
    return uses_pretrained(settings) and epoch <= settings.model.freeze_epochs


def freeze_backbone(model: torch.nn.Module, frozen: bool) -> None:
    """Freeze or unfreeze the backbone (BatchNorm of a frozen one stays in eval)."""
    models.freeze_backbone(model, frozen)

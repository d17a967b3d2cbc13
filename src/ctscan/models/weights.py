"""Pretrained-weight files: read a state dict, copy it into a backbone, name what does not fit.

Kept apart from the registry (`ctscan.models`) so that resnet.py and efficientnet.py import this
module and the registry imports them lazily: no import cycle inside the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn


class WeightsUnavailable(RuntimeError):
    """Pretrained weights cannot be found or do not fit the model; `.fix` says what to do."""

    def __init__(self, message: str, fix: str) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return f"{self.message} Fix: {self.fix}"


def read_state_dict(path: Path, fix: str) -> dict[str, torch.Tensor]:
    """Read a weights file: a plain state dict or a checkpoint holding one under a usual key."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsUnavailable(f"weights file '{path}' does not exist.", fix)
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and weights_only errors all land here
        raise WeightsUnavailable(
            f"cannot read weights file '{path}' as a torch state dict ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}).",
            fix,
        ) from None
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsUnavailable(
            f"weights file '{path}' holds no state dict of tensors (found {type(obj).__name__}).",
            fix,
        )
    out = {}
    for key, value in obj.items():
        for prefix in ("_orig_mod.", "module."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    return out


def load_backbone(
    model: nn.Module, state: Mapping[str, torch.Tensor], head_prefix: str, source: str, fix: str
) -> None:
    """Copy `state` into `model`'s backbone: every backbone tensor matched by name and shape.

    Keys under `head_prefix` are dropped from `state` and left as initialised in the model.
    Raises WeightsUnavailable listing missing, unexpected or mis-shaped keys.
    """
    target = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    wanted = {k for k in target if not k.startswith(head_prefix)}
    missing = sorted(wanted - state.keys())
    unexpected = sorted(state.keys() - wanted)
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in wanted & state.keys()
        if state[k].shape != target[k].shape
    )
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape", misshaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    if problems:
        raise WeightsUnavailable(
            f"weights from {source} do not fit {type(model).__name__} ({'; '.join(problems)}).",
            fix,
        )
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert all(k.startswith(head_prefix) for k in result.missing_keys)

"""Pretrained-weight files: read a state dict, copy it into a backbone, name what does not fit.

Kept apart from the registry (`ctscan.models`) so that resnet.py and efficientnet.py import this
module and the registry imports them lazily: no import cycle inside the package.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ctscan.errors import CtscanError

if TYPE_CHECKING:
    import torch
    from torch import nn


class WeightsUnavailable(CtscanError):
    """Pretrained weights cannot be found or do not fit the model; `.fix` says what to do."""


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
    from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

    out = dict(obj)
    for prefix in ("_orig_mod.", "module."):
        consume_prefix_in_state_dict_if_present(out, prefix)
    return out


def fit_problems(
    target: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
) -> list[str]:
    """What keeps `state` from loading into a model whose state dict is `target`: its missing,
    unexpected and mis-shaped keys (the first five of each named); empty when it fits."""
    missing = sorted(target.keys() - state.keys())
    unexpected = sorted(state.keys() - target.keys())
    misshaped = sorted(
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in target.keys() & state.keys()
        if state[k].shape != target[k].shape
    )
    problems = []
    for label, keys in (
        ("missing", missing),
        ("unexpected", unexpected),
        ("shape mismatch", misshaped),
    ):
        if keys:
            shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
            problems.append(f"{len(keys)} {label}: {shown}")
    return problems


def load_backbone(
    model: nn.Module, state: Mapping[str, torch.Tensor], head_prefix: str, source: str, fix: str
) -> None:
    """Copy `state` into `model`'s backbone (all but `head_prefix`), matched by name and shape."""
    state = {k: v for k, v in state.items() if not k.startswith(head_prefix)}
    wanted = {k: v for k, v in model.state_dict().items() if not k.startswith(head_prefix)}
    if problems := fit_problems(wanted, state):
        raise WeightsUnavailable(
            f"weights from {source} do not fit {type(model).__name__} ({'; '.join(problems)}).", fix
        )
    model.load_state_dict(state, strict=False)

"""Several trained networks (and flipped views of the input) as one model.

The output is the log of p = mean over members m and views v of softmax(net_m(v(x)) / T_m), so
every consumer of logits (evaluate, calibration, predict, serve, the ONNX export) handles an
ensemble like one network. Probabilities, not logits, are averaged: the members' logit scales
differ (their temperatures do), and the mean of calibrated probabilities is what the literature on
deep ensembles evaluates (Lakshminarayanan et al., 2017). p is clamped at the smallest normal
float32, so a class every member rules out gets a very negative but finite logit.
"""

from __future__ import annotations

from functools import reduce

import torch
from torch import nn

FLIPS: tuple[str, ...] = ("hflip", "vflip")
_TINY = float(torch.finfo(torch.float32).tiny)


class Member(nn.Module):
    """One network of an ensemble: its registry name (for Grad-CAM) and its temperature."""

    def __init__(self, net: nn.Module, name: str, temperature: float = 1.0) -> None:
        super().__init__()  # temperature > 0: checked where a checkpoint is read
        self.net = net
        self.name = str(name)
        self.temperature = float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calibrated logits of this member: net(x) / T."""
        logits = self.net(x).float()
        return logits if self.temperature == 1.0 else logits / self.temperature


def check_flips(flips: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """The flips, each known and once, in FLIPS order; a ValueError names a wrong one."""
    if unknown := [f for f in flips if f not in FLIPS]:
        raise ValueError(f"unknown flip '{unknown[0]}'; expected any of {', '.join(FLIPS)}.")
    return tuple(f for f in FLIPS if f in flips)


def _view(x: torch.Tensor, flip: str) -> torch.Tensor:
    return x.flip(-1) if flip == "hflip" else x.flip(-2)


class Ensemble(nn.Module):
    """Members averaged over the identity view and the given flips: see the module docstring."""

    def __init__(self, members: list[Member], flips: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.flips = check_flips(flips)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, views = x.shape[0], 1 + len(self.flips)
        inputs = torch.cat([x, *(_view(x, f) for f in self.flips)]) if self.flips else x
        each = (  # each member's probabilities (views * B, C) summed over the views
            torch.softmax(member(inputs), dim=1).reshape(views, batch, -1).sum(dim=0)
            for member in self.members
        )
        total = reduce(torch.add, each)  # not sum(): its start, int 0, is one more Add in ONNX
        mean = total / float(len(self.members) * views)
        return torch.log(mean.clamp_min(_TINY))

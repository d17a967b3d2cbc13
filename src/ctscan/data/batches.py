"""Device-resident batches: a whole split on the device as uint8; DDP gets disjoint shards."""

from __future__ import annotations

from collections.abc import Iterator

import torch


def epoch_order(n: int, *, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    """The sample order of one epoch; the same on every rank (seeded by seed and epoch)."""
    if not shuffle:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def shard(order: torch.Tensor, rank: int, world_size: int, *, pad: bool) -> torch.Tensor:
    """This rank's disjoint share of `order`; `pad` wraps around so every rank has as many."""
    if pad:
        per_rank = -(-len(order) // world_size)
        total = per_rank * world_size
        if total > len(order):  # wrap around (several times if there are fewer samples than ranks)
            order = order.repeat(-(-total // len(order)))[:total]
    return order[rank::world_size]


def batch_indices(
    indices: torch.Tensor, batch_size: int, *, drop_last: bool
) -> Iterator[torch.Tensor]:
    """Consecutive index batches; `drop_last` skips a short final batch (if a full one exists)."""
    n = len(indices)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        yield indices[start : start + batch_size]


def steps_per_epoch(n: int, batch_size: int, world_size: int, *, drop_last: bool = True) -> int:
    """Number of batches each rank sees per epoch for `n` training samples."""
    per_rank = -(-n // world_size)
    if drop_last and per_rank >= batch_size:
        return per_rank // batch_size
    return -(-per_rank // batch_size)

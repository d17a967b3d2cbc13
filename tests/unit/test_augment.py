"""Batched augmentation and batching: invariants of the tensor ops and the DDP sharding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ctscan.data.augment import augment, mix_batch, mixed_loss
from ctscan.data.batches import batch_indices, epoch_order, shard, steps_per_epoch
from ctscan.data.transforms import model_input
from ctscan.settings import AugmentSettings

NONE = AugmentSettings(
    rotation_deg=0,
    scale_min=1,
    scale_max=1,
    translate=0,
    hflip=0,
    vflip=0,
    brightness=0,
    contrast=0,
    erasing=0,
)


def _batch(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, size, size), generator=g, dtype=torch.uint8)


def test_identity_settings_leave_images_unchanged() -> None:
    x = _batch().float() / 255
    assert torch.allclose(augment(x, NONE), x, atol=1e-5)


def test_flip_probability_one_is_a_mirror() -> None:
    x = _batch().float() / 255
    flipped = augment(x, NONE.model_copy(update={"hflip": 1.0}))
    assert torch.allclose(flipped, torch.flip(x, dims=[3]), atol=1e-5)
    vflipped = augment(x, NONE.model_copy(update={"vflip": 1.0}))
    assert torch.allclose(vflipped, torch.flip(x, dims=[2]), atol=1e-5)


def test_disabled_augmentation_is_a_no_op() -> None:
    x = _batch().float() / 255
    assert augment(x, AugmentSettings(enabled=False)) is x


def test_erasing_zeroes_a_rectangle() -> None:
    x = torch.ones(8, 1, 32, 32)
    out = augment(x, NONE.model_copy(update={"erasing": 1.0}))
    zeros = (out == 0).sum(dim=(1, 2, 3)).float() / (32 * 32)
    assert ((zeros > 0.0) & (zeros <= 0.25)).all()


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 6),
    size=st.integers(8, 40),
    rotation=st.floats(0, 180),
    scale=st.tuples(st.floats(0.5, 1.0), st.floats(1.0, 1.5)),
    translate=st.floats(0, 0.5),
    brightness=st.floats(0, 1),
    contrast=st.floats(0, 1),
    erasing=st.floats(0, 1),
    channels=st.sampled_from([1, 3]),
)
def test_model_input_shape_dtype_range(
    n, size, rotation, scale, translate, brightness, contrast, erasing, channels
) -> None:
    aug = AugmentSettings(
        rotation_deg=rotation,
        scale_min=scale[0],
        scale_max=scale[1],
        translate=translate,
        brightness=brightness,
        contrast=contrast,
        erasing=erasing,
        hflip=0.5,
        vflip=0.5,
    )
    raw = augment(_batch(n, size).float() / 255, aug)
    assert raw.shape == (n, 1, size, size) and raw.dtype == torch.float32
    assert raw.min() >= 0.0 and raw.max() <= 1.0
    x = model_input(
        _batch(n, size),
        mean=0.25,
        std=0.5,
        channels=channels,
        augment=lambda b: augment(b, aug),
        channels_last=True,
    )
    assert x.shape == (n, channels, size, size)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert x.min() >= (0 - 0.25) / 0.5 - 1e-6 and x.max() <= (1 - 0.25) / 0.5 + 1e-6
    if channels == 3:
        assert torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])


def test_normalisation_without_augmentation() -> None:
    imgs = _batch()
    x = model_input(imgs, mean=0.5, std=0.25, channels=1)
    assert torch.allclose(x, (imgs.float() / 255 - 0.5) / 0.25)


@given(
    n=st.integers(1, 200), world=st.integers(1, 5), seed=st.integers(0, 99), epoch=st.integers(1, 9)
)
def test_shards_are_disjoint_and_cover(n: int, world: int, seed: int, epoch: int) -> None:
    order = epoch_order(n, seed=seed, epoch=epoch, shuffle=True)
    assert sorted(order.tolist()) == list(range(n))
    assert torch.equal(order, epoch_order(n, seed=seed, epoch=epoch, shuffle=True))  # every rank
    parts = [shard(order, r, world, pad=False) for r in range(world)]
    flat = sorted(i for p in parts for i in p.tolist())
    assert flat == list(range(n))
    padded = [shard(order, r, world, pad=True) for r in range(world)]
    assert len({len(p) for p in padded}) == 1
    assert set().union(*(set(p.tolist()) for p in padded)) == set(range(n))


@given(n=st.integers(1, 300), batch=st.integers(1, 64), world=st.integers(1, 4))
def test_steps_per_epoch_matches_the_batches(n: int, batch: int, world: int) -> None:
    mine = shard(torch.arange(n), 0, world, pad=True)
    batches = list(batch_indices(mine, batch, drop_last=True))
    assert len(batches) == steps_per_epoch(n, batch, world)
    assert all(len(b) == batch for b in batches) or len(mine) < batch


def test_epochs_shuffle_differently() -> None:
    a = epoch_order(100, seed=0, epoch=1, shuffle=True)
    b = epoch_order(100, seed=0, epoch=2, shuffle=True)
    assert not torch.equal(a, b)
    assert torch.equal(epoch_order(5, seed=0, epoch=1, shuffle=False), torch.arange(5))


# ---- MixUp / CutMix -------------------------------------------------------------------------


def _tagged(n: int = 8, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is the constant i + 1 (so every pixel names its source); labels 0..n-1."""
    x = (torch.arange(n, dtype=torch.float32) + 1).view(n, 1, 1, 1).expand(n, 3, size, size)
    return x.contiguous(), torch.arange(n)


def test_mixing_is_off_by_default_and_draws_no_random_numbers() -> None:
    x, labels = _tagged()
    before = torch.get_rng_state()
    out, mixed = mix_batch(x, labels, AugmentSettings())
    assert out is x and mixed is None
    assert torch.equal(torch.get_rng_state(), before)  # default training stays bit-identical
    off = AugmentSettings(enabled=False, mixup_alpha=0.4, cutmix_alpha=1.0)
    assert mix_batch(x, labels, off)[1] is None
    never = AugmentSettings(mixup_alpha=0.4, mix_prob=0.0)
    assert all(mix_batch(x, labels, never)[1] is None for _ in range(20))


@given(seed=st.integers(0, 10_000), alpha=st.floats(0.05, 5.0))
@settings(max_examples=30, deadline=None)
def test_mixup_is_the_convex_mix_of_an_image_and_its_partner(seed: int, alpha: float) -> None:
    torch.manual_seed(seed)
    x, labels = _tagged()
    out, mixed = mix_batch(x, labels, AugmentSettings(mixup_alpha=alpha))
    assert mixed is not None and mixed.kind == "mixup" and 0.0 <= mixed.lam <= 1.0
    partner = mixed.partner_labels  # labels are 0..n-1: the partner's index
    assert sorted(partner.tolist()) == labels.tolist()  # a permutation
    torch.testing.assert_close(out, x * mixed.lam + x[partner] * (1.0 - mixed.lam))


@given(seed=st.integers(0, 10_000), alpha=st.floats(0.05, 5.0))
@settings(max_examples=30, deadline=None)
def test_cutmix_lambda_is_the_share_of_the_image_that_stays_its_own(
    seed: int, alpha: float
) -> None:
    torch.manual_seed(seed)
    x, labels = _tagged()
    out, mixed = mix_batch(x, labels, AugmentSettings(cutmix_alpha=alpha))
    assert mixed is not None and mixed.kind == "cutmix"
    partner = mixed.partner_labels
    own = out == x
    assert torch.all(own | (out == x[partner]))  # every pixel comes from one of the two
    moved = [i for i in range(len(x)) if partner[i] != i]
    for i in moved:  # the same box in every image: its own share is lam
        assert float(own[i].float().mean()) == pytest.approx(mixed.lam)


def test_mixed_loss_is_cross_entropy_against_the_mixed_soft_target() -> None:
    torch.manual_seed(0)
    x, labels = _tagged()
    labels = labels % 4
    _, mixed = mix_batch(x, labels, AugmentSettings(mixup_alpha=0.4))
    assert mixed is not None
    logits = torch.randn(len(labels), 4)
    target = F.one_hot(labels, 4) * mixed.lam + F.one_hot(mixed.partner_labels, 4) * (
        1.0 - mixed.lam
    )
    for smoothing in (0.0, 0.1):
        torch.testing.assert_close(
            mixed_loss(logits, labels, mixed, label_smoothing=smoothing),
            F.cross_entropy(logits, target.float(), label_smoothing=smoothing),
        )
    torch.testing.assert_close(mixed_loss(logits, labels, None), F.cross_entropy(logits, labels))


def test_both_alphas_use_both_kinds() -> None:
    torch.manual_seed(0)
    x, labels = _tagged()
    both = AugmentSettings(mixup_alpha=0.4, cutmix_alpha=1.0)
    kinds = {mix_batch(x, labels, both)[1].kind for _ in range(40)}
    assert kinds == {"mixup", "cutmix"}

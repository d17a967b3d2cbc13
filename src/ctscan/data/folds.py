"""K folds over train + valid, grouped by picture, stratified by class.

`ctscan train --folds K` (ops/cv.py) trains one model per fold on the other K-1 folds. The valid
split of the Kaggle set has 72 images, 10 of them copies of train images: its accuracy says little
about test; K folds give every train + valid image one out-of-fold prediction.

Copies never straddle folds: images with the same pixels (the store's `pixel_hashes`), and near
copies the audit found (`audit.json`, `same_picture` pairs: re-encoded or resized copies), form
one group and go to one fold, or the held-out fold would be scored on pictures its model trained
on. The test split is not part of any fold, but its images still link groups: a train image and
a valid image that are both near copies of one test image are one picture too.

Assignment (deterministic for a seed): groups are shuffled with the seed, then placed largest
first, each into the fold that keeps the class counts of all folds closest to an even share
(the sum of squared deviations, as scikit-learn's StratifiedGroupKFold does), ties to the
fold with fewer images.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctscan.data.audit import picture_group_ids
from ctscan.data.store import Split, Store
from ctscan.errors import SettingsError

POOL_SPLITS = ("train", "valid")  # what the folds divide; test stays out


def grouped_folds(labels: Any, groups: Any, k: int, seed: int) -> np.ndarray:
    """The fold (0..k-1) of each image: every group in one fold, classes spread evenly."""
    y = np.asarray(labels, dtype=np.int64)
    g = np.asarray(groups, dtype=np.int64)
    if y.shape != g.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and groups {g.shape} must be two equal 1-D arrays.")
    unique, inverse = np.unique(g, return_inverse=True)
    if k < 2:
        raise ValueError(f"k must be 2 or more, got {k}.")
    if len(unique) < k:
        raise ValueError(f"{len(unique)} picture groups cannot fill {k} folds.")
    classes = int(y.max()) + 1
    counts = np.zeros((len(unique), classes), dtype=np.int64)
    np.add.at(counts, (inverse, y), 1)
    order = np.random.default_rng(seed).permutation(len(unique))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]  # largest first
    target = counts.sum(axis=0) / k
    fold_counts = np.zeros((k, classes), dtype=np.float64)
    fold_of_group = np.empty(len(unique), dtype=np.int64)
    for placed, group in enumerate(order):
        trial = fold_counts + counts[group]  # (k, classes): each fold with this group added
        cost = ((fold_counts - target) ** 2).sum() - ((fold_counts - target) ** 2).sum(axis=1)
        cost = cost + ((trial - target) ** 2).sum(axis=1)
        empty = fold_counts.sum(axis=1) == 0
        if len(order) - placed <= empty.sum():  # as many groups left as empty folds: fill them
            cost = np.where(empty, cost, np.inf)
        best = np.lexsort((fold_counts.sum(axis=1), cost))[0]  # lowest cost, then fewest images
        fold_of_group[group] = best
        fold_counts[best] += counts[group]
    return fold_of_group[inverse]


def _take(split: Split, index: np.ndarray) -> Split:
    at = torch.as_tensor(index, dtype=torch.long)
    return Split(
        images=split.images[at],
        labels=split.labels[at],
        paths=[split.paths[i] for i in index],
        hashes=[split.hashes[i] for i in index],
    )


@dataclass(frozen=True)
class FoldPlan:
    """The folds of a store for K and a seed: who is held out where, and a fingerprint."""

    k: int
    seed: int
    paths: tuple[str, ...]  # train then valid, as the store lists them
    fold: np.ndarray  # (N,) fold of each path
    group: np.ndarray  # (N,) picture group of each path
    labels: np.ndarray  # (N,)
    pool: Split = field(repr=False, compare=False)  # the N images, built once for all folds

    @property
    def identity(self) -> str:
        """sha256 of the assignment: a rerun must hold out the same images."""
        rows = sorted(zip(self.paths, self.fold.tolist(), strict=True))
        return hashlib.sha256(json.dumps([self.k, rows]).encode()).hexdigest()

    def held_out(self, fold: int) -> np.ndarray:
        return np.flatnonzero(self.fold == fold)

    def counts(self, num_classes: int) -> list[list[int]]:
        """Images per class in each fold (k rows)."""
        return [
            np.bincount(self.labels[self.fold == f], minlength=num_classes).tolist()
            for f in range(self.k)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "seed": self.seed,
            "identity": self.identity,
            "groups": len(np.unique(self.group)),
            "images_in_shared_groups": int((np.bincount(self.group)[self.group] > 1).sum()),
            "held_out": {
                str(f + 1): [self.paths[i] for i in self.held_out(f)] for f in range(self.k)
            },
        }


def plan_folds(store: Store, k: int, seed: int) -> FoldPlan:
    """Assign the store's train + valid images to k folds (see the module docstring)."""
    splits = [store.split(name) for name in POOL_SPLITS]  # train then valid: what folds divide
    pool = Split(
        images=torch.cat([s.images for s in splits]),
        labels=torch.cat([s.labels for s in splits]),
        paths=[p for s in splits for p in s.paths],
        hashes=[h for s in splits for h in s.hashes],
    )
    # the other splits join the grouping (copies chained through a test image), then drop out;
    # only their paths and pixel hashes are read, never their images or labels
    others = [store.identities(name) for name in store.split_names if name not in POOL_SPLITS]
    near = (store.audit() or {}).get("near_duplicates", [])  # near copies join groups too
    groups = picture_group_ids(
        [*pool.paths, *(p for paths, _ in others for p in paths)],
        [*pool.hashes, *(h for _, hashes in others for h in hashes)],
        [(n["a"], n["b"]) for n in near if n.get("same_picture")],
    )
    groups = np.array(groups[: len(pool.paths)], dtype=np.int64)
    n_groups = len(np.unique(groups))
    if k < 2 or k > n_groups:
        raise SettingsError(
            f"--folds {k}: cross-validation needs 2 to {n_groups} folds here (train + valid "
            f"hold {len(pool.paths)} images in {n_groups} picture groups).",
            f"use --folds {min(5, n_groups)} (or leave --folds out to select on the valid split).",
        )
    labels = pool.labels.cpu().numpy()
    fold = grouped_folds(labels, groups, k, seed)
    return FoldPlan(k, seed, tuple(pool.paths), fold, groups, labels, pool)


def fold_splits(plan: FoldPlan, fold: int) -> tuple[Split, Split]:
    """(train, held out) for fold `fold` (0-based): the other folds train, this one validates."""
    train = np.flatnonzero(plan.fold != fold)
    return _take(plan.pool, train), _take(plan.pool, plan.held_out(fold))

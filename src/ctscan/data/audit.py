"""Audit the raw images: pixel hashes, duplicates, cross-split leaks, label conflicts, bad files.

Identity is the decoded gray pixels (`pixel_hash`), not the file bytes, so the same picture saved
as PNG and as lossless WebP/TIFF is one image.

Near duplicates, two stages:
1. candidates: 64-bit difference hashes (`dhash64`) within `near_duplicate_distance` bits
   (default 4 of 64). On the real set, every re-encoded or resized copy found lies within 3 bits,
   but so do many distinct slices of one scan (CT slices share their layout), so a dHash match
   alone is only a candidate for review.
2. near copies: candidates whose 32x32 thumbnails (`thumbnail`) differ by a mean absolute
   difference <= SAME_PICTURE_MAD (1.75 of 255). Measured on the real set: re-encoded or
   resized copies of one picture give 0.02..1.33, the closest distinct slices 2.19 and up.
   A near copy is the same picture for `leak_policy`, like an exact duplicate.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image

from ctscan import CLASS_NAMES
from ctscan.data.raw import SPLITS
from ctscan.errors import DataError


def pixel_hash(gray: np.ndarray) -> str:
    """SHA-256 (hex) of a decoded gray image: its shape and its uint8 pixels in C order."""
    arr = np.ascontiguousarray(gray, dtype=np.uint8)
    return hashlib.sha256(f"{arr.shape[0]}x{arr.shape[1]}:".encode() + arr.tobytes()).hexdigest()


def dhash64(gray: np.ndarray) -> int:
    """A 64-bit perceptual difference hash of a (H, W) gray image.

    Area-averaged (Pillow BOX, in float so flat regions give no rounding ties) to 9 x 8; bit
    r*8+c (most significant first) is 1 where column c+1 is brighter than column c in row r.
    """
    small = Image.fromarray(np.asarray(gray, dtype=np.float32)).resize((9, 8), Image.Resampling.BOX)
    a = np.asarray(small, dtype=np.float32)  # (8, 9)
    bits = a[:, 1:] > a[:, :-1]  # (8, 8)
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


THUMB_SIDE = 32
SAME_PICTURE_MAD = 1.75


def thumbnail(gray: np.ndarray) -> bytes:
    """A 32x32 uint8 thumbnail (Pillow BILINEAR, antialiased, aspect ignored), as 1024 bytes."""
    small = Image.fromarray(np.ascontiguousarray(gray, dtype=np.uint8)).resize(
        (THUMB_SIDE, THUMB_SIDE), Image.Resampling.BILINEAR
    )
    return np.asarray(small, dtype=np.uint8).tobytes()


def thumb_mad(a: bytes, b: bytes) -> float | None:
    """Mean absolute difference (0..255) of two thumbnails, or None if either is missing."""
    if not a or not b or len(a) != len(b):
        return None
    x = np.frombuffer(a, dtype=np.uint8).astype(np.int16)
    y = np.frombuffer(b, dtype=np.uint8).astype(np.int16)
    return float(np.abs(x - y).mean())


def near_pairs(hashes: Sequence[int], max_distance: int) -> list[tuple[int, int, int]]:
    """All (i, j, distance) with i < j and Hamming distance <= max_distance, vectorised."""
    h = np.asarray([int(x) for x in hashes], dtype=np.uint64)
    out: list[tuple[int, int, int]] = []
    block = 1024  # rows at a time: memory stays at block * n * 8 bytes
    for start in range(0, len(h), block):
        rows = h[start : start + block]
        dist = np.bitwise_count(rows[:, None] ^ h[None, :]).astype(np.int64)  # (b, n)
        later = np.arange(len(h))[None, :] > np.arange(start, start + len(rows))[:, None]
        i, j = np.nonzero((dist <= max_distance) & later)
        out.extend(zip((i + start).tolist(), j.tolist(), dist[i, j].tolist(), strict=True))
    return out


class _Row:
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: tuples as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ImageRecord:
    """What preprocessing learned about one readable raw image."""

    path: str  # relative to the raw dir: split/class folder/file
    split: str
    label: str
    pixel_hash: str
    dhash: int
    width: int
    height: int
    mode: str
    format: str | None
    thumb: bytes = field(default=b"", repr=False)  # `thumbnail()`; b"": no near-copy check


@dataclass(frozen=True)
class BadFile(_Row):
    """A raw file that could not be used, and why."""

    path: str
    split: str
    label: str
    reason: str


@dataclass(frozen=True)
class DuplicateGroup(_Row):
    """Files whose decoded pixels are identical."""

    pixel_hash: str
    paths: tuple[str, ...]
    splits: tuple[str, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class NearDuplicate(_Row):
    """Two different pixel hashes (each possibly with exact copies) with close dHashes."""

    distance: int
    a: tuple[str, ...]
    b: tuple[str, ...]
    splits: tuple[str, ...]
    labels: tuple[str, ...]
    mad: float | None = None
    same_picture: bool = False


@dataclass(frozen=True)
class DroppedImage(_Row):
    """An image left out of the store by the leak policy, and why."""

    path: str
    split: str
    label: str
    kind: Literal["label_conflict", "leak", "duplicate"]
    reason: str


@dataclass
class AuditReport:
    """Everything the audit found; `to_dict()` is JSON-ready (written as audit.json)."""

    raw_dir: str | None
    counts: dict[str, dict[str, int]]
    total: int
    sizes: dict[str, int]
    size_range: dict[str, int]
    modes: dict[str, int]
    formats: dict[str, int]
    suffix_mismatches: list[dict[str, str]]
    bad_files: list[BadFile]
    ignored_files: list[dict[str, str]]
    exact_duplicates: list[DuplicateGroup]
    cross_split_duplicates: list[DuplicateGroup]
    label_conflicts: list[DuplicateGroup]
    near_duplicates: list[NearDuplicate]
    near_duplicate_distance: int
    on_leak: str | None = None
    dropped: list[DroppedImage] = field(default_factory=list)
    kept_counts: dict[str, dict[str, int]] | None = None
    drop_preview: list[DroppedImage] | None = None  # what on_leak=drop removes (always filled)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for key, value in d.items():  # lists of rows as lists of dicts
            if isinstance(value, list):
                d[key] = [v.to_dict() if hasattr(v, "to_dict") else v for v in value]
        d["duplicated_files"] = sum(len(g.paths) for g in self.exact_duplicates)
        copies = [n for n in self.near_duplicates if n.same_picture]
        d["near_copy_pairs"] = len(copies)
        d["cross_split_near_copy_pairs"] = sum(len(n.splits) > 1 for n in copies)
        return d


def _counts(records: Iterable[Any]) -> dict[str, dict[str, int]]:
    counts = {s: dict.fromkeys(CLASS_NAMES, 0) for s in SPLITS}
    for r in records:
        counts.setdefault(r.split, dict.fromkeys(CLASS_NAMES, 0))
        counts[r.split][r.label] = counts[r.split].get(r.label, 0) + 1
    return counts


def _ordered(values: Iterable[str], order: Sequence[str]) -> tuple[str, ...]:
    unique = set(values)
    return tuple(sorted(unique, key=lambda v: (order.index(v) if v in order else len(order), v)))


def _by_hash(records: Sequence[ImageRecord]) -> dict[str, list[ImageRecord]]:
    """The records of each pixel hash, in first-seen order."""
    by_hash: dict[str, list[ImageRecord]] = defaultdict(list)
    for r in records:
        by_hash[r.pixel_hash].append(r)
    return by_hash


def duplicate_groups(records: Sequence[ImageRecord]) -> list[DuplicateGroup]:
    """Groups of more than one record with the same pixel hash, in first-seen order."""
    return [
        DuplicateGroup(
            pixel_hash=h,
            paths=tuple(r.path for r in group),
            splits=_ordered((r.split for r in group), SPLITS),
            labels=_ordered((r.label for r in group), CLASS_NAMES),
        )
        for h, group in _by_hash(records).items()
        if len(group) > 1
    ]


def near_duplicates(records: Sequence[ImageRecord], max_distance: int) -> list[NearDuplicate]:
    """Pairs of distinct pixel hashes whose dHashes differ in at most `max_distance` bits."""
    groups = list(_by_hash(records).values())
    found = []
    for i, j, dist in near_pairs([g[0].dhash for g in groups], max_distance):
        both = groups[i] + groups[j]
        mad = thumb_mad(groups[i][0].thumb, groups[j][0].thumb)
        found.append(
            NearDuplicate(
                distance=dist,
                a=tuple(r.path for r in groups[i]),
                b=tuple(r.path for r in groups[j]),
                splits=_ordered((r.split for r in both), SPLITS),
                labels=_ordered((r.label for r in both), CLASS_NAMES),
                mad=None if mad is None else round(mad, 3),
                same_picture=mad is not None and mad <= SAME_PICTURE_MAD,
            )
        )
    found.sort(key=lambda n: (not n.same_picture, n.distance, n.a, n.b))
    return found


def _suffix_mismatches(records: Sequence[ImageRecord]) -> list[dict[str, str]]:
    """Files whose suffix names another format than the one they hold (a JPEG named .png)."""
    format_of = Image.registered_extensions()  # ".jpg" -> "JPEG"
    out = []
    for r in records:
        suffix = os.path.splitext(r.path)[1].lower()
        if r.format and format_of.get(suffix) != ("JPEG" if r.format == "MPO" else r.format):
            out.append({"path": r.path, "format": r.format, "suffix": suffix})
    return out


def audit(
    records: Sequence[ImageRecord],
    *,
    bad_files: Sequence[BadFile] = (),
    ignored: Sequence[tuple[str, str]] = (),
    near_duplicate_distance: int = 4,
    raw_dir: str | None = None,
    on_leak: str | None = None,
) -> AuditReport:
    """Summarise the records: counts, sizes, modes, duplicates, leakage, conflicts, bad files."""
    groups = duplicate_groups(records)
    sizes = Counter(f"{r.width}x{r.height}" for r in records)
    size_range = {  # min_width, max_width, min_height, max_height
        f"{f.__name__}_{side}": f(getattr(r, side) for r in records)
        for side in ("width", "height")
        for f in (min, max)
        if records
    }
    report = AuditReport(
        raw_dir=raw_dir,
        counts=_counts(records),
        total=len(records),
        sizes=dict(sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0]))),
        size_range=size_range,
        modes=dict(Counter(r.mode for r in records).most_common()),
        formats=dict(Counter(r.format or "?" for r in records).most_common()),
        suffix_mismatches=_suffix_mismatches(records),
        bad_files=list(bad_files),
        ignored_files=[{"path": str(p), "reason": why} for p, why in ignored],
        exact_duplicates=groups,
        cross_split_duplicates=[g for g in groups if len(g.splits) > 1],
        label_conflicts=[g for g in groups if len(g.labels) > 1],
        near_duplicates=near_duplicates(records, near_duplicate_distance),
        near_duplicate_distance=near_duplicate_distance,
    )
    report.drop_preview = leak_policy(records, "drop", report.near_duplicates)[1]
    if on_leak is not None:
        kept, dropped = leak_policy(records, on_leak, report.near_duplicates)
        report.on_leak, report.dropped, report.kept_counts = on_leak, dropped, _counts(kept)
    return report


def picture_group_ids(
    paths: Sequence[str], hashes: Sequence[str], near_pairs: Iterable[tuple[Sequence[str], ...]]
) -> list[int]:
    """A group id per image (0, 1, ...): same pixel hash, or linked by a near-copy pair."""
    parent: dict[str, str] = {}

    def root(h: str) -> str:
        while parent.setdefault(h, h) != h:
            parent[h] = parent[parent[h]]
            h = parent[h]
        return h

    hash_of = dict(zip(paths, hashes, strict=True))
    for pair in near_pairs:
        linked = [hash_of[p] for side in pair for p in side if p in hash_of]
        for h in linked[1:]:
            ra, rb = root(linked[0]), root(h)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
    ids: dict[str, int] = {}
    return [ids.setdefault(root(h), len(ids)) for h in hashes]


def leak_policy(
    records: Sequence[ImageRecord], on_leak: str, near: Sequence[NearDuplicate] = ()
) -> tuple[list[ImageRecord], list[DroppedImage]]:
    """Split records into (kept, dropped with reason), picture by picture.

    A picture is a set of records with the same pixel hash, joined with the near copies in
    `near` (pairs with `same_picture`; other near duplicates are never acted on).
    - keep: everything is kept; the audit reports the problems.
    - drop, in this order:
      1. every copy of a picture seen under two or more labels (no right answer to learn or test);
      2. valid/test copies of a picture that is in train (leakage into model selection / test);
         a picture in valid and test but not train: the valid copies go, so the test split (the
         reported number) stays as large as possible and selection never sees a test image;
      3. extra copies within valid or within test (the first path is kept) so a metric does not
         count one picture twice. Duplicates within train are kept: they only re-weight training.
    """
    if on_leak not in ("keep", "drop"):
        raise DataError(f"on_leak '{on_leak}' is not one of keep, drop.", "set data.on_leak.")
    if on_leak == "keep":
        return list(records), []
    pictures: dict[int, list[int]] = defaultdict(list)  # record indices by picture
    copies = [(n.a, n.b) for n in near if n.same_picture]
    paths, hashes = [r.path for r in records], [r.pixel_hash for r in records]
    for i, picture in enumerate(picture_group_ids(paths, hashes, copies)):
        pictures[picture].append(i)
    reasons: dict[int, tuple[str, str]] = {}

    def same(i: int, sources: list[int]) -> str:
        """Why record i goes: name an exact copy among `sources` if there is one."""
        exact = [j for j in sources if records[j].pixel_hash == records[i].pixel_hash]
        b = records[(exact or sources)[0]]
        return f"{'same pixels as' if exact else 'near copy of'} {b.path} in {b.split}"

    for idxs in pictures.values():
        if len(idxs) < 2:
            continue
        group = [records[i] for i in idxs]
        labels = _ordered((r.label for r in group), CLASS_NAMES)
        if len(labels) > 1:
            where = ", ".join(f"{r.path} ({r.label})" for r in group)
            why = f"one picture under labels {'/'.join(labels)}: {where}"
            reasons.update(dict.fromkeys(idxs, ("label_conflict", why)))
            continue
        train = [i for i in idxs if records[i].split == "train"]
        test = [i for i in idxs if records[i].split == "test"]
        source = train or test
        for i in idxs:
            if source and records[i].split not in (records[source[0]].split, "train"):
                reasons[i] = ("leak", same(i, source))
        for split in ("valid", "test"):
            left = [i for i in idxs if records[i].split == split and i not in reasons]
            for n, i in enumerate(left[1:], 1):
                reasons[i] = ("duplicate", same(i, left[:n]))
    kept = [r for i, r in enumerate(records) if i not in reasons]
    dropped = [
        DroppedImage(r.path, r.split, r.label, *reasons[i])
        for i, r in enumerate(records)
        if i in reasons
    ]
    return kept, dropped

"""Pixel hashes, dHash, duplicate/leak/conflict grouping and the leak policy."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from rich.console import Console

from ctscan import CLASS_NAMES
from ctscan.data.audit import (
    BadFile,
    ImageRecord,
    audit,
    dhash64,
    leak_policy,
    near_pairs,
    pixel_hash,
    thumb_mad,
    thumbnail,
)
from ctscan.data.raw import SPLITS
from ctscan.data.transforms import decode_image, to_gray
from ctscan.errors import DataError
from ctscan.render import render_summary
from tests.conftest import smooth_image


def _roundtrip(gray: np.ndarray, fmt: str, **kwargs: object) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, fmt, **kwargs)
    return to_gray(decode_image(buf.getvalue()))


def _record(path: str, split: str, label: str, h: str, dhash: int = 0) -> ImageRecord:
    return ImageRecord(
        path=path,
        split=split,
        label=label,
        pixel_hash=h,
        dhash=dhash,
        width=10,
        height=10,
        mode="L",
        format="PNG",
    )


# ---- hashes -------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
)
def test_pixel_hash_depends_on_pixels_not_on_the_file_format(h: int, w: int, seed: int) -> None:
    gray = np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)
    expected = pixel_hash(gray)
    assert _roundtrip(gray, "PNG").tobytes() == gray.tobytes()
    assert pixel_hash(_roundtrip(gray, "PNG")) == expected
    assert pixel_hash(_roundtrip(gray, "WEBP", lossless=True)) == expected
    assert pixel_hash(_roundtrip(gray, "TIFF")) == expected
    changed = gray.copy()
    changed[0, 0] ^= 1
    assert pixel_hash(changed) != expected


def test_pixel_hash_includes_the_shape() -> None:
    flat = np.arange(12, dtype=np.uint8)
    assert pixel_hash(flat.reshape(3, 4)) != pixel_hash(flat.reshape(4, 3))


def test_dhash_is_stable_under_resize_and_noise_and_far_for_other_pictures() -> None:
    a = smooth_image(1, 120, 160)
    assert dhash64(a) == dhash64(a.copy())
    resized = np.asarray(Image.fromarray(a).resize((80, 60), Image.Resampling.BILINEAR))
    noisy = np.clip(a + np.random.default_rng(0).normal(0, 2, a.shape), 0, 255).astype(np.uint8)
    assert (dhash64(a) ^ dhash64(resized)).bit_count() <= 4
    assert (dhash64(a) ^ dhash64(noisy)).bit_count() <= 4
    others = [(dhash64(a) ^ dhash64(smooth_image(s, 120, 160))).bit_count() for s in range(2, 12)]
    assert min(others) > 8
    assert 0 <= dhash64(a) < 2**64
    assert dhash64(np.zeros((1, 1), np.uint8)) == 0  # tiny and flat images work


def test_thumbnail_difference_separates_copies_from_other_pictures() -> None:
    a = smooth_image(3, 90, 120)
    copy = np.asarray(Image.fromarray(a).resize((100, 75), Image.Resampling.BILINEAR))
    assert len(thumbnail(a)) == 32 * 32
    assert thumb_mad(thumbnail(a), thumbnail(copy)) < 1.0
    assert thumb_mad(thumbnail(a), thumbnail(smooth_image(4, 90, 120))) > 5.0
    assert thumb_mad(b"", thumbnail(a)) is None


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1), max_size=40), st.integers(0, 64))
def test_near_pairs_matches_brute_force(hashes: list[int], max_distance: int) -> None:
    # few distinct bit patterns, so that close pairs happen
    hashes = [h & 0xFF00FF for h in hashes]
    expected = sorted(
        (i, j, (hashes[i] ^ hashes[j]).bit_count())
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if (hashes[i] ^ hashes[j]).bit_count() <= max_distance
    )
    assert sorted(near_pairs(hashes, max_distance)) == expected


# ---- grouping -----------------------------------------------------------------------------

records_strategy = st.lists(
    st.tuples(st.sampled_from(SPLITS), st.sampled_from(CLASS_NAMES), st.sampled_from("abcdefg")),
    max_size=30,
).map(lambda rows: [_record(f"{s}/{lab}/{i}.png", s, lab, h) for i, (s, lab, h) in enumerate(rows)])


@settings(max_examples=100, deadline=None)
@given(records_strategy)
def test_groups_partition_the_duplicated_files(records: list[ImageRecord]) -> None:
    report = audit(records, near_duplicate_distance=0)
    counts = Counter(r.pixel_hash for r in records)
    grouped = [p for g in report.exact_duplicates for p in g.paths]
    assert len(grouped) == len(set(grouped))  # disjoint
    assert set(grouped) == {r.path for r in records if counts[r.pixel_hash] > 1}
    by_path = {r.path: r for r in records}
    for g in report.exact_duplicates:
        assert len(g.paths) > 1
        assert {by_path[p].pixel_hash for p in g.paths} == {g.pixel_hash}
        assert set(g.splits) == {by_path[p].split for p in g.paths}
        assert set(g.labels) == {by_path[p].label for p in g.paths}
    assert all(len(g.splits) > 1 for g in report.cross_split_duplicates)
    assert all(len(g.labels) > 1 for g in report.label_conflicts)
    assert len(report.cross_split_duplicates) == sum(
        len(g.splits) > 1 for g in report.exact_duplicates
    )
    assert report.total == len(records)
    assert sum(sum(c.values()) for c in report.counts.values()) == len(records)


@settings(max_examples=150, deadline=None)
@given(records_strategy)
def test_leak_policy_drop_removes_leaks_conflicts_and_eval_duplicates(
    records: list[ImageRecord],
) -> None:
    kept, dropped = leak_policy(records, "drop")
    assert len(kept) + len(dropped) == len(records)
    assert {r.path for r in kept}.isdisjoint({d.path for d in dropped})
    assert all(d.reason and d.kind in ("label_conflict", "leak", "duplicate") for d in dropped)
    train = {r.pixel_hash for r in kept if r.split == "train"}
    for split in ("valid", "test"):
        hashes = [r.pixel_hash for r in kept if r.split == split]
        assert len(hashes) == len(set(hashes))  # no double counting
        assert train.isdisjoint(hashes)  # no leak from train
    valid = {r.pixel_hash for r in kept if r.split == "valid"}
    test = {r.pixel_hash for r in kept if r.split == "test"}
    assert valid.isdisjoint(test)
    labels: dict[str, set[str]] = {}
    for r in kept:
        labels.setdefault(r.pixel_hash, set()).add(r.label)
    assert all(len(v) == 1 for v in labels.values())
    # train is only touched by label conflicts; a hash under one label keeps every train copy
    for d in dropped:
        if d.split == "train":
            assert d.kind == "label_conflict"
    # every picture without a conflict survives somewhere
    all_labels: dict[str, set[str]] = {}
    for r in records:
        all_labels.setdefault(r.pixel_hash, set()).add(r.label)
    assert {h for h, v in all_labels.items() if len(v) == 1} == {r.pixel_hash for r in kept}


@given(records_strategy)
def test_leak_policy_keep_keeps_everything(records: list[ImageRecord]) -> None:
    assert leak_policy(records, "keep") == (records, [])


def test_leak_policy_choices() -> None:
    r = [
        _record("train/a/1.png", "train", "normal", "x"),
        _record("test/a/1.png", "test", "normal", "x"),
        _record("valid/a/1.png", "valid", "normal", "y"),
        _record("test/a/2.png", "test", "normal", "y"),
        _record("test/a/3.png", "test", "normal", "z"),
        _record("test/a/4.png", "test", "normal", "z"),
    ]
    kept, dropped = leak_policy(r, "drop")
    assert [k.path for k in kept] == ["train/a/1.png", "test/a/2.png", "test/a/3.png"]
    reasons = {d.path: (d.kind, d.reason) for d in dropped}
    assert reasons["test/a/1.png"] == ("leak", "same pixels as train/a/1.png in train")
    assert reasons["valid/a/1.png"] == ("leak", "same pixels as test/a/2.png in test")
    assert reasons["test/a/4.png"] == ("duplicate", "same pixels as test/a/3.png in test")
    with pytest.raises(DataError, match="keep, drop"):
        leak_policy(r, "delete")


def test_near_copies_join_pictures_for_the_leak_policy() -> None:
    a = smooth_image(10, 120, 160)
    small = np.asarray(Image.fromarray(a).resize((120, 90), Image.Resampling.BILINEAR))
    other = smooth_image(11, 120, 160)

    def rec(path: str, split: str, g: np.ndarray) -> ImageRecord:
        return ImageRecord(
            path=path,
            split=split,
            label="normal",
            pixel_hash=pixel_hash(g),
            dhash=dhash64(g),
            width=g.shape[1],
            height=g.shape[0],
            mode="L",
            format="PNG",
            thumb=thumbnail(g),
        )

    records = [
        rec("train/n/a.png", "train", a),
        rec("test/n/a_small.png", "test", small),
        rec("test/n/other.png", "test", other),
    ]
    report = audit(records, near_duplicate_distance=4, on_leak="drop")
    copies = [n for n in report.near_duplicates if n.same_picture]
    assert len(copies) == 1 and copies[0].splits == ("train", "test")
    assert [d.path for d in report.dropped] == ["test/n/a_small.png"]
    assert "near copy of train/n/a.png" in report.dropped[0].reason
    assert report.kept_counts["test"]["normal"] == 1
    d = report.to_dict()
    assert d["near_copy_pairs"] == 1 and d["cross_split_near_copy_pairs"] == 1


# ---- report -------------------------------------------------------------------------------


def test_report_is_json_ready_and_renders() -> None:
    records = [
        _record("train/x/1.png", "train", "normal", "h1", 0b1111),
        _record("test/x/1.png", "test", "normal", "h1", 0b1111),
        _record("train/y/2.png", "train", "adenocarcinoma", "h2", 0b1110),
    ]
    bad = [BadFile("train/x/bad.png", "train", "normal", "'train/x/bad.png' is empty (0 bytes).")]
    report = audit(
        records,
        bad_files=bad,
        ignored=[("train/x/notes.txt", "not an image")],
        near_duplicate_distance=1,
        on_leak="drop",
    )
    d = json.loads(json.dumps(report.to_dict()))
    assert d["counts"]["train"]["normal"] == 1 and d["total"] == 3
    assert d["bad_files"][0]["path"] == "train/x/bad.png"
    assert d["cross_split_duplicates"][0]["splits"] == ["train", "test"]
    assert d["near_duplicates"][0]["distance"] == 1
    assert d["dropped"][0]["path"] == "test/x/1.png"
    assert d["sizes"] == {"10x10": 3} and d["modes"] == {"L": 3}
    console = Console(record=True, width=200)
    console.print(render_summary(report))
    text = console.export_text()
    for part in (
        "Images per split and class",
        "bad files",
        "train/x/bad.png",
        "cross-split",
        "dropped (on_leak=drop)",
        "0 (-1)",
    ):
        assert part in text

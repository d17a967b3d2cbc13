"""Raw tree discovery and the Kaggle folder-name -> label mapping."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ctscan import CLASS_NAMES
from ctscan.data.raw import SPLITS, canonical_label, discover, scan_raw
from ctscan.errors import DataError
from tests.conftest import LONG, SHORT

SEPARATORS = [".", "_", "-", " ", "__", " - "]
STAGE_SUFFIXES = [
    "",
    "_left.lower.lobe_T2_N0_M0_Ib",
    "_left.hilum_T2_N2_M0_IIIa",
    "_left.hilum_T1_N2_M0_IIIa",
    "_T3_N1_M0_IIb",
    "-right.upper.lobe",
]


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_kaggle_long_and_short_names_map_to_their_label(label: str) -> None:
    assert canonical_label(LONG[label]) == label
    assert canonical_label(SHORT[label]) == label
    assert canonical_label(label) == label
    assert canonical_label(label.upper()) == label


@given(
    label=st.sampled_from(CLASS_NAMES),
    sep=st.sampled_from(SEPARATORS),
    suffix=st.sampled_from(STAGE_SUFFIXES),
    case_bits=st.lists(st.booleans(), min_size=40, max_size=40),
)
def test_any_case_and_separator_maps_to_the_same_label(
    label: str, sep: str, suffix: str, case_bits: list[bool]
) -> None:
    name = sep.join(label.split("_")) + suffix
    name = "".join(
        c.upper() if up else c.lower() for c, up in zip(name, case_bits * 3, strict=False)
    )
    assert canonical_label(f"  {name} ") == label


@given(junk=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._- ", max_size=20))
def test_junk_prefix_is_rejected(junk: str) -> None:
    with pytest.raises(DataError) as err:
        canonical_label("x" + junk)  # no class name starts with x
    assert "adenocarcinoma" in str(err.value) and "rename" in str(err.value)


@given(
    label=st.sampled_from(CLASS_NAMES),
    word=st.text(alphabet="abcdefghjkmopqrsuvwyz", min_size=3, max_size=8).filter(
        lambda w: w != "upper"  # the only location word these letters can spell
    ),
)
def test_unknown_words_after_the_class_are_rejected(label: str, word: str) -> None:
    with pytest.raises(DataError):
        canonical_label(f"{label}_{word}")


def test_close_spelling_gets_a_suggestion() -> None:
    with pytest.raises(DataError, match="Did you mean: adenocarcinoma"):
        canonical_label("adenocarcinomaa")


def test_discover_finds_every_image_sorted_with_labels(raw_tree: Path) -> None:
    images = discover(raw_tree)
    files = [p for p in raw_tree.rglob("*") if p.is_file() and not p.name.startswith(".")]
    assert len(images) == len(files) - 1  # notes.txt is not an image
    keys = [(SPLITS.index(r.split), r.label_index, r.relpath) for r in images]
    assert keys == sorted(keys)
    for r in images:
        assert CLASS_NAMES[r.label_index] == r.label
        assert r.path.parent.parent.name == r.split
        assert canonical_label(r.path.parent.name) == r.label
    assert {r.split for r in images} == set(SPLITS)
    assert discover(raw_tree) == images  # deterministic
    # upper-case suffixes count as images
    assert any(r.path.suffix in (".BMP", ".PNG") for r in images)


def test_scan_lists_ignored_files(raw_tree: Path) -> None:
    tree = scan_raw(raw_tree)
    ignored = {p.name: why for p, why in tree.ignored}
    assert "notes.txt" in ignored and "suffix" in ignored["notes.txt"]
    assert ".DS_Store" in ignored


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        ("missing_raw_dir", ["does not exist", "dvc pull"]),
        ("missing_split", ["valid", "missing", "dvc pull"]),
        ("empty_class", ["normal", "holds no images", "dvc pull"]),
        ("file_in_split", ["stray.png", "class folder"]),
        ("two_folders_one_label", ["NORMAL", "normal", "both map"]),
    ],
)
def test_broken_trees_raise_naming_the_path_and_the_fix(
    make_raw_tree, variant: str, expected: list[str]
) -> None:
    root = make_raw_tree(variant)
    with pytest.raises(DataError) as err:
        discover(root)
    text = str(err.value)
    for part in expected:
        assert part in text
    assert err.value.fix


def test_unknown_class_folder_names_the_split(make_raw_tree) -> None:
    root = make_raw_tree("minimal")
    (root / "train" / "pneumonia").mkdir()
    (root / "train" / "pneumonia" / "a.png").write_bytes(b"x")
    with pytest.raises(DataError, match="pneumonia") as err:
        discover(root)
    assert "train" in str(err.value)

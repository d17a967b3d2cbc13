"""The processed store: round trip, atomic replacement, refusal of corrupt or stale stores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ctscan import CLASS_NAMES
from ctscan.data import store as store_mod
from ctscan.data.raw import discover
from ctscan.data.store import (
    Split,
    check_store_target,
    find_dvc_file,
    find_dvc_hash,
    load_store,
    raw_fingerprint,
    stale_keys,
    write_store,
)
from ctscan.data.transforms import PreprocessSpec
from ctscan.errors import DataError
from ctscan.settings import DataSettings

SIZE = 16


def _arrays(seed: int, n: int = 5) -> dict[str, Split]:
    rng = np.random.default_rng(seed)
    out = {}
    for split in ("train", "valid", "test"):
        out[split] = Split(
            images=rng.integers(0, 256, (n, 1, SIZE, SIZE), dtype=np.uint8),
            labels=rng.integers(0, 4, n).astype(np.int64),
            paths=[f"{split}/normal/{i}.png" for i in range(n)],
            hashes=[f"{seed}-{split}-{i}" for i in range(n)],
        )
    return out


def _write(path: Path, seed: int = 0, **data: object) -> Path:
    settings = DataSettings(image_size=SIZE, **data).model_dump(mode="json")
    spec = PreprocessSpec(SIZE, settings["resize"], 0.4, 0.2, CLASS_NAMES)
    return write_store(
        path,
        _arrays(seed),
        spec=spec,
        data_settings=settings,
        raw_dir="raw",
        raw_fingerprint=f"fp{seed}",
        dvc_md5="abc.dir",
        on_leak="keep",
        audit={"total": 15},
    )


def test_round_trip(tmp_path: Path) -> None:
    arrays = _arrays(0)
    store = load_store(_write(tmp_path / "processed"))
    assert store.spec == PreprocessSpec(SIZE, "pad", 0.4, 0.2, CLASS_NAMES)
    assert store.split_names == ("train", "valid", "test")
    assert store.counts == {"train": 5, "valid": 5, "test": 5}
    for name, arr in arrays.items():
        split = store.split(name)
        assert split.images.dtype == torch.uint8 and split.images.shape == (5, 1, SIZE, SIZE)
        assert split.labels.dtype == torch.int64
        assert np.array_equal(split.images.numpy(), arr.images)
        assert np.array_equal(split.labels.numpy(), arr.labels)
        assert split.paths == arr.paths and split.hashes == arr.hashes
        assert len(split) == 5
    meta = store.meta
    assert meta["dvc_md5"] == "abc.dir" and meta["raw_fingerprint"] == "fp0"
    assert meta["data"]["image_size"] == SIZE and meta["ctscan_version"]
    assert meta["class_counts"]["train"] == {
        c: int((arrays["train"].labels == i).sum()) for i, c in enumerate(CLASS_NAMES)
    }
    assert store.audit() == {"total": 15}
    with pytest.raises(DataError, match="split 'holdout'"):
        store.split("holdout")


def test_arrays_load_without_pickle(tmp_path: Path) -> None:
    path = _write(tmp_path / "processed")
    arr = np.load(path / "train_images.npy", allow_pickle=False)
    assert arr.dtype == np.uint8 and arr.shape == (5, 1, SIZE, SIZE)


def test_rewrite_replaces_the_old_store_and_leaves_no_temp_dirs(tmp_path: Path) -> None:
    _write(tmp_path / "processed", seed=0)
    _write(tmp_path / "processed", seed=1)
    store = load_store(tmp_path / "processed")
    assert store.meta["raw_fingerprint"] == "fp1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


def test_failed_write_leaves_the_old_store_intact(tmp_path: Path, monkeypatch) -> None:
    _write(tmp_path / "processed", seed=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "processed").iterdir()}
    calls = {"n": 0}
    real_save = np.save

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(store_mod.np, "save", failing_save)
    with pytest.raises(DataError, match="disk full") as err:  # one line, not an OSError traceback
        _write(tmp_path / "processed", seed=1)
    assert f"'{tmp_path / 'processed'}'" in str(err.value) and "old store" in str(err.value)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in (tmp_path / "processed").iterdir()}
    assert after == before
    assert load_store(tmp_path / "processed").meta["raw_fingerprint"] == "fp0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]


def test_refuses_to_replace_a_folder_that_is_not_a_store(tmp_path: Path) -> None:
    target = tmp_path / "home"
    target.mkdir()
    (target / "thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not a ctscan processed store"):
        _write(target)
    assert (target / "thesis.tex").read_text() == "precious"


def test_missing_store(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no processed store") as err:
        load_store(tmp_path / "nope")
    assert "ctscan preprocess" in str(err.value)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: (p / "meta.json").unlink(), "'meta.json' is missing"),
        (lambda p: (p / "index.json").unlink(), "'index.json' is missing"),
        (lambda p: (p / "meta.json").write_text("{not json"), "JSON cannot be read"),
        (lambda p: (p / "valid_labels.npy").unlink(), "'valid_labels.npy' is missing"),
        (lambda p: (p / "train_images.npy").write_bytes(b"\x93NUMPY"), "bytes, expected"),
    ],
)
def test_corrupt_or_partial_store_is_refused(tmp_path: Path, damage, expected: str) -> None:
    path = _write(tmp_path / "processed")
    damage(path)
    with pytest.raises(DataError, match=expected) as err:
        load_store(path)
    assert "ctscan preprocess" in str(err.value)


def test_flipped_byte_is_caught_by_the_checksum(tmp_path: Path) -> None:
    path = _write(tmp_path / "processed")
    data = bytearray((path / "test_images.npy").read_bytes())
    data[-1] ^= 0xFF
    (path / "test_images.npy").write_bytes(bytes(data))
    with pytest.raises(DataError, match="sha256"):
        load_store(path)
    assert load_store(path, verify=False).split("test").images.shape[0] == 5


def test_inconsistent_arrays_are_refused_at_split_load(tmp_path: Path) -> None:
    path = _write(tmp_path / "processed")
    meta = json.loads((path / "meta.json").read_text())
    meta["spec"]["image_size"] = 2 * SIZE  # meta.json itself carries no checksum
    (path / "meta.json").write_text(json.dumps(meta))
    store = load_store(path)
    with pytest.raises(DataError, match="inconsistent"):
        store.split("train")


def test_stale_settings_are_refused(tmp_path: Path) -> None:
    path = _write(tmp_path / "processed")
    same = DataSettings(image_size=SIZE)
    assert load_store(path, expect_data=same).spec.image_size == SIZE
    # settings that do not change the tensors are ignored (no file was skipped)
    load_store(
        path,
        expect_data=DataSettings(
            image_size=SIZE, near_duplicate_distance=9, max_file_bytes=10, on_bad_file="skip"
        ),
    )
    for changed, key in [
        ({"image_size": 2 * SIZE}, "data.image_size"),
        ({"resize": "crop"}, "data.resize"),
        ({"on_leak": "drop" if same.on_leak == "keep" else "keep"}, "data.on_leak"),
    ]:
        with pytest.raises(DataError, match=key) as err:
            load_store(path, expect_data={**same.model_dump(mode="json"), **changed})
        assert "ctscan preprocess" in str(err.value)


def test_bad_file_settings_do_not_make_a_store_stale(tmp_path: Path) -> None:
    """Which files a store skipped is the store's own: train need not repeat on_bad_file."""
    settings = DataSettings(image_size=SIZE, on_bad_file="skip").model_dump(mode="json")
    spec = PreprocessSpec(SIZE, "pad", 0.4, 0.2, CLASS_NAMES)
    path = write_store(
        tmp_path / "p",
        _arrays(0),
        spec=spec,
        data_settings=settings,
        raw_dir=None,
        raw_fingerprint="fp",
        on_leak="keep",
        skipped=[{"path": "train/normal/x.png", "reason": "empty"}],
    )
    for data in (
        DataSettings(image_size=SIZE),  # the defaults: on_bad_file="error"
        DataSettings(image_size=SIZE, on_bad_file="skip", max_image_pixels=5, max_file_bytes=9),
    ):
        assert stale_keys(load_store(path).meta, data) == []
        store = load_store(path, expect_data=data)
        assert store.meta["skipped"] == [{"path": "train/normal/x.png", "reason": "empty"}]
    with pytest.raises(DataError, match=r"data\.image_size"):  # tensor settings still count
        load_store(path, expect_data=DataSettings(image_size=2 * SIZE))


def test_raw_fingerprint_tracks_paths_and_sizes_not_mtimes(make_raw_tree) -> None:
    root = make_raw_tree("minimal")
    fp = raw_fingerprint(root)
    assert fp == raw_fingerprint(discover(root))
    target = root / "train" / "normal" / "a.png"
    os.utime(target, ns=(1, 1))
    assert raw_fingerprint(root) == fp
    target.write_bytes(target.read_bytes() + b"\x00")
    grown = raw_fingerprint(root)
    assert grown != fp
    target.rename(target.with_name("b.png"))
    assert raw_fingerprint(root) not in (fp, grown)


def test_dvc_hash_is_read_from_data_dvc(tmp_path: Path) -> None:
    raw = tmp_path / "data" / "chest-ctscan-images"
    raw.mkdir(parents=True)
    assert find_dvc_hash(raw) is None
    (tmp_path / "data.dvc").write_text(
        "outs:\n- md5: 5a37ee9bddad98aa04154962c0bea4b2.dir\n  size: 118962916\n"
        "  nfiles: 944\n  hash: md5\n  path: data\n"
    )
    assert find_dvc_hash(raw) == "5a37ee9bddad98aa04154962c0bea4b2.dir"


def test_meta_records_the_raw_folder_in_full_and_relative_to_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "raw").mkdir()
    meta = load_store(_write(Path("outputs/processed"))).meta  # raw_dir="raw", as given
    assert meta["raw_dir"] == str(tmp_path / "raw")  # absolute: checkable from any folder
    assert meta["raw_dir_from_store"] == "../../raw"


def test_dvc_hash_comes_from_the_dvc_file_tracking_the_raw_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dvc = "outs:\n- md5: {}\n  path: data\n"
    project = tmp_path / "project"
    raw = project / "data" / "chest-ctscan-images"
    (project / "data.dvc").parent.mkdir(parents=True)
    (project / "data.dvc").write_text(dvc.format("1" * 32 + ".dir"))
    assert find_dvc_file(raw) == project / "data.dvc"  # found without the folder on disk
    # A data.dvc in the working directory tracks another folder: it is not this data's version.
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "raw").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data.dvc").write_text(dvc.format("2" * 32 + ".dir"))
    assert find_dvc_hash(elsewhere / "raw") is None
    assert find_dvc_hash(raw) == "1" * 32 + ".dir"


def test_store_target_that_is_a_file_or_under_one_is_refused_writing_nothing(
    tmp_path: Path,
) -> None:
    (tmp_path / "notes.txt").write_text("keep me")
    cases = [
        (tmp_path / "notes.txt", "is a file, not a folder"),
        (tmp_path / "notes.txt" / "store", "lies under '" + str(tmp_path / "notes.txt")),
        (tmp_path / "notes.txt" / "a" / "b" / "store", "which is a file"),
    ]
    for target, expected in cases:
        with pytest.raises(DataError, match=expected) as err:
            check_store_target(target)
        assert f"'{target}'" in str(err.value) and "--out" in str(err.value)
        with pytest.raises(DataError, match=expected):
            _write(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_store_target_that_cannot_be_written_is_refused() -> None:
    # /sys refuses mkdir even to root (a chmod-ed folder would not stop root)
    target = Path("/sys/ctscan-test-no-such-folder/processed")
    if not Path("/sys").is_dir():
        pytest.skip("no /sys on this platform")
    with pytest.raises(DataError, match="cannot be written") as err:
        check_store_target(target)
    assert f"'{target}'" in str(err.value)
    assert not target.parent.exists()


def test_store_target_checks_leave_an_existing_store_alone(tmp_path: Path) -> None:
    path = _write(tmp_path / "processed")
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    assert check_store_target(path) == path
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["processed"]  # the probe is gone

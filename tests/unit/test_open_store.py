"""A store is refused once the raw images or the data settings it was made from change."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from ctscan.data.preprocess import run_preprocess
from ctscan.data.store import load_store, open_store
from ctscan.errors import DataError
from ctscan.settings import DataSettings, Settings, load_settings
from tests.conftest import build_raw_tree, save_gray, smooth_image

RAW = Path("data/chest-ctscan-images")
STORE = Path("outputs/processed")


def test_stale_store_is_refused(make_raw_tree: Callable[[str], Path], tmp_path: Path) -> None:
    raw = make_raw_tree("minimal")
    out = tmp_path / "processed"
    settings = load_settings(
        [], [f'paths.raw_dir="{raw}"', f'paths.processed_dir="{out}"', "data.image_size=32"]
    )
    run_preprocess(settings)
    data = settings.data.model_dump()
    store = open_store(out, expect_data=data)
    assert store.counts["train"] > 0
    with pytest.raises(DataError, match="image_size"):
        open_store(out, expect_data={**data, "image_size": 64})
    with pytest.raises(DataError, match="on_leak"):
        open_store(out, expect_data={**data, "on_leak": "drop"})
    # A new raw image: the store no longer matches the data.
    folder = next(p for p in (raw / "train").iterdir() if p.is_dir())
    save_gray(smooth_image(99, 40, 40).astype(np.uint8), folder / "new.png")
    with pytest.raises(DataError, match="raw images changed"):
        open_store(out, expect_data=data)
    # Without the raw folder on disk (a copied store) the settings check alone applies, and the
    # store says that its raw images were not checked.
    moved = tmp_path / "elsewhere"
    raw.rename(moved)
    copied = open_store(out, expect_data=data)
    assert copied.counts == store.counts
    assert copied.raw_check == f"raw folder not found: '{raw}'"


def _project(root: Path, monkeypatch: pytest.MonkeyPatch, variant: str = "minimal") -> Settings:
    """A project folder with raw images, preprocessed from inside it with relative paths."""
    build_raw_tree(root / RAW, variant)
    monkeypatch.chdir(root)
    settings = Settings(
        paths={"raw_dir": RAW, "processed_dir": STORE},
        data={"image_size": 32, "on_bad_file": "skip"},
    )
    run_preprocess(settings, workers=0)
    return settings


def _grow_a_raw_file(raw: Path) -> None:
    target = raw / "train" / "normal" / "a.png"
    target.write_bytes(target.read_bytes() + b"\x00")  # same name, new size


def test_stale_raw_images_are_caught_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    data = _project(project, monkeypatch).data
    other = tmp_path / "somewhere" / "else"
    other.mkdir(parents=True)
    monkeypatch.chdir(other)
    store = open_store(project / STORE, expect_data=data)
    assert store.raw_check == "verified" and store.raw_dir == project / RAW
    assert store.raw_warning is None
    _grow_a_raw_file(project / RAW)
    with pytest.raises(DataError, match="raw images changed") as err:
        open_store(project / STORE, expect_data=data)
    assert "ctscan preprocess" in str(err.value) and str(project / RAW) in str(err.value)


def test_a_store_without_its_raw_folder_is_usable_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    data = _project(project, monkeypatch).data
    shutil.rmtree(project / RAW)
    monkeypatch.chdir(tmp_path)
    store = open_store(project / STORE, expect_data=data)
    assert store.counts["train"] > 0 and len(store.split("train")) == store.counts["train"]
    assert store.raw_check == f"raw folder not found: '{project / RAW}'"
    assert store.raw_dir is None
    assert store.raw_warning is not None and str(project / RAW) in store.raw_warning
    # With the project's data.dvc at hand, the check says which data version it records.
    dvc = project / "data.dvc"
    dvc.write_text(f"outs:\n- md5: {'a' * 32}.dir\n  path: data\n")
    note = open_store(project / STORE, expect_data=data).raw_check
    assert note.startswith("raw folder not found") and "records another data version" in note


def test_a_project_moved_whole_is_still_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = _project(tmp_path / "project", monkeypatch).data
    moved = tmp_path / "moved"
    (tmp_path / "project").rename(moved)
    monkeypatch.chdir(tmp_path)
    store = open_store(moved / STORE, expect_data=data)  # the recorded absolute path is gone
    assert store.raw_check == "verified" and store.raw_dir == moved / RAW
    _grow_a_raw_file(moved / RAW)
    with pytest.raises(DataError, match="changed"):
        open_store(moved / STORE, expect_data=data)


def test_a_store_that_skipped_bad_files_opens_with_the_default_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = tmp_path / "project"
    _project(project, monkeypatch, variant="truncated")  # preprocessed with on_bad_file=skip
    store = open_store(STORE, expect_data=DataSettings(image_size=32))  # on_bad_file="error"
    assert [s["path"] for s in store.meta["skipped"]] == ["train/normal/cut.png"]
    assert "truncated" in store.meta["skipped"][0]["reason"]
    assert store.raw_check == "verified"
    assert load_store(STORE).meta["data"]["on_bad_file"] == "skip"  # recorded, not required

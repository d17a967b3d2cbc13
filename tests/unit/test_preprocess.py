"""Preprocess end to end on the synthetic raw tree: store, audit, leak policy, bad files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ctscan import CLASS_NAMES
from ctscan.data import preprocess as pp
from ctscan.data.preprocess import mean_std, run_audit, run_preprocess
from ctscan.data.raw import discover
from ctscan.data.store import load_store, raw_fingerprint
from ctscan.data.transforms import prepare
from ctscan.errors import DataError
from ctscan.settings import Settings

SIZE = 32


def _settings(**data: object) -> Settings:
    return Settings(data={"image_size": SIZE, **data})


@pytest.fixture(scope="module")
def dropped_store(raw_tree: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("pp") / "processed"
    return run_preprocess(_settings(on_leak="drop"), raw_tree, out, workers=0)


def test_store_holds_every_kept_image_prepared_by_the_one_transform(
    dropped_store, raw_tree: Path
) -> None:
    store = load_store(dropped_store.store_dir, expect_data=_settings(on_leak="drop").data)
    assert store.meta["raw_fingerprint"] == raw_fingerprint(raw_tree)
    for split in ("train", "valid", "test"):
        data = store.split(split)
        assert len(data) == dropped_store.counts[split]
        for i in (0, len(data) - 1):
            expected = prepare(raw_tree / data.paths[i], SIZE, resize="pad")
            assert np.array_equal(data.images[i, 0].numpy(), expected)
            label = CLASS_NAMES[int(data.labels[i])]
            assert data.paths[i].split("/")[0] == split
            assert label in {r.label for r in discover(raw_tree) if r.relpath == data.paths[i]}


def test_mean_std_come_from_the_train_split(dropped_store) -> None:
    store = load_store(dropped_store.store_dir)
    train = store.split("train").images.numpy().astype(np.float64) / 255
    assert store.spec.mean == pytest.approx(train.mean(), abs=1e-9)
    assert store.spec.std == pytest.approx(train.std(), abs=1e-9)
    assert mean_std(np.zeros((2, 1, 4, 4), np.uint8)) == (0.0, 1.0)  # flat: std falls back to 1


def test_drop_policy_removes_the_planted_problems(dropped_store, raw_tree: Path) -> None:
    report = dropped_store.report
    dropped = {
        d.path.split("/", 1)[0] + "/" + d.path.rsplit("/", 1)[1]: d.kind for d in report.dropped
    }
    assert dropped == {
        "train/conflict.png": "label_conflict",  # both copies, two labels
        "valid/leak_copy.png": "leak",
        "test/leak_copy.tif": "leak",
        "valid/vt.png": "leak",  # in valid and test: the valid copy goes
        "test/twice_b.png": "duplicate",
        "test/near_small.png": "leak",  # a resized copy of a train image
    }
    assert sum(d.kind == "label_conflict" for d in report.dropped) == 2
    n_raw = len(discover(raw_tree))
    assert sum(dropped_store.counts.values()) == n_raw - len(report.dropped)
    meta = load_store(dropped_store.store_dir).meta
    assert len(meta["dropped"]) == len(report.dropped)
    assert meta["on_leak"] == "drop" and meta["skipped"] == []


def test_audit_json_reports_duplicates_leaks_conflicts_and_ignored(dropped_store) -> None:
    audit = json.loads((dropped_store.store_dir / "audit.json").read_text())
    groups = [sorted(p.rsplit("/", 1)[1] for p in g["paths"]) for g in audit["exact_duplicates"]]
    assert ["dup_a.png", "dup_b.webp"] in groups  # PNG and lossless WebP: same pixels
    assert len(audit["cross_split_duplicates"]) == 2  # leak (3 splits) and vt (valid+test)
    assert len(audit["label_conflicts"]) == 1
    assert audit["near_copy_pairs"] == 1 and audit["cross_split_near_copy_pairs"] == 1
    assert {f["path"] for f in audit["ignored_files"]} >= {"train/.DS_Store"}
    assert any(f["path"].endswith("notes.txt") for f in audit["ignored_files"])
    modes = set(audit["modes"])
    assert {"L", "RGB", "RGBA", "LA", "P", "I;16", "CMYK", "1"} <= modes
    assert {"PNG", "JPEG", "WEBP", "TIFF", "BMP"} <= set(audit["formats"])


def test_keep_policy_keeps_everything(raw_tree: Path, tmp_path: Path) -> None:
    result = run_preprocess(_settings(on_leak="keep"), raw_tree, tmp_path / "p", workers=0)
    assert sum(result.counts.values()) == len(discover(raw_tree))
    assert result.report.dropped == [] and result.report.cross_split_duplicates


def test_error_mode_names_every_bad_file(make_raw_tree, tmp_path: Path) -> None:
    root = make_raw_tree("zero_byte")
    (root / "test" / "normal" / "junk.png").write_text("text")
    with pytest.raises(DataError) as err:
        run_preprocess(_settings(), root, tmp_path / "p", workers=0)
    text = str(err.value)
    assert "2 raw file(s)" in text
    assert "train/normal/empty.png" in text and "test/normal/junk.png" in text
    assert "on_bad_file=skip" in text
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("variant", ["zero_byte", "truncated", "text_as_png", "bomb"])
def test_skip_mode_lists_every_skipped_file(make_raw_tree, tmp_path: Path, variant: str) -> None:
    root = make_raw_tree(variant)
    result = run_preprocess(_settings(on_bad_file="skip"), root, tmp_path / "p", workers=0)
    assert len(result.report.bad_files) == 1
    bad = result.report.bad_files[0]
    assert bad.split == "train" and bad.label == "normal" and bad.reason
    assert sum(result.counts.values()) == len(discover(root)) - 1
    store = load_store(result.store_dir)
    assert store.meta["skipped"] == [bad.to_dict()]
    assert store.meta["data"]["on_bad_file"] == "skip"
    audit = json.loads((result.store_dir / "audit.json").read_text())
    assert audit["bad_files"] == [bad.to_dict()]


def test_run_audit_writes_nothing_and_lists_bad_files(make_raw_tree, tmp_path: Path) -> None:
    root = make_raw_tree("truncated")
    settings = _settings()
    settings.paths.processed_dir = tmp_path / "p"
    report = run_audit(settings, root, workers=0)
    assert [b.path for b in report.bad_files] == ["train/normal/cut.png"]
    assert "truncated" in report.bad_files[0].reason
    assert not (tmp_path / "p").exists()
    assert report.on_leak == settings.data.on_leak


def test_a_split_left_empty_is_an_error(make_raw_tree, tmp_path: Path) -> None:
    root = make_raw_tree("minimal")
    for folder in (root / "valid").iterdir():  # every valid image is also in train
        for img in folder.iterdir():
            img.write_bytes((root / "train" / folder.name / img.name).read_bytes())
    with pytest.raises(DataError, match="split 'valid' has no usable images"):
        run_preprocess(_settings(on_leak="drop"), root, tmp_path / "p", workers=0)


def test_pool_gives_the_same_store_as_one_process(
    raw_tree: Path, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.setattr(pp, "POOL_MIN_IMAGES", 0)
    seen = []
    pooled = run_preprocess(
        _settings(),
        raw_tree,
        tmp_path / "a",
        workers=2,
        progress=lambda done, total: seen.append((done, total)),
    )
    single = run_preprocess(_settings(), raw_tree, tmp_path / "b", workers=0)
    n = len(discover(raw_tree))
    assert seen[-1] == (n, n) and len(seen) == n
    a, b = load_store(pooled.store_dir), load_store(single.store_dir)
    for split in ("train", "valid", "test"):
        assert np.array_equal(a.split(split).images.numpy(), b.split(split).images.numpy())
        assert a.split(split).hashes == b.split(split).hashes
    assert a.spec == b.spec


def test_a_bad_out_path_fails_before_any_image_is_read(
    make_raw_tree, tmp_path: Path, monkeypatch
) -> None:
    root = make_raw_tree("minimal")
    (tmp_path / "file.txt").write_text("x")

    def no_scan(*args, **kwargs):
        raise AssertionError("the raw images were scanned before the output was checked")

    monkeypatch.setattr(pp, "_scan", no_scan)
    for out in (tmp_path / "file.txt", tmp_path / "file.txt" / "store"):
        with pytest.raises(DataError, match="file, not a folder") as err:
            run_preprocess(_settings(), root, out, workers=0)
        assert f"'{out}'" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt", "minimal"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_pool_workers_ignore_ctrl_c_and_leave_sigterm_to_the_default() -> None:
    import signal

    pid = os.fork()  # a worker of its own: the initializer also ties it to its parent's life
    if pid == 0:
        pp._init_worker(os.getppid())
        ignores = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os._exit(0 if ignores and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)
    assert os.waitpid(pid, 0)[1] == 0

"""Run folders and resume: what a resume may change, where it writes, what it refuses, locks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ctscan.data.store import load_store
from ctscan.engine.checkpoint import read_checkpoint
from ctscan.engine.evaluate import evaluate_checkpoint
from ctscan.engine.runtime import resolve_runtime
from ctscan.engine.train import run_training
from ctscan.errors import CheckpointError, CtscanError
from ctscan.files import folder_lock
from tests.unit.conftest_store import engine_overrides, engine_settings

QUIET = {"train.evaluate_test": "false"}


def _train(store: Path, tmp_path: Path, out: Path, resume: str | None = None, **extra: object):
    settings = engine_settings(store, tmp_path / "runs", **{**QUIET, **extra})
    return run_training(settings, out_dir=out, resume=resume)


def test_best_checkpoint_is_not_resumable(synthetic_store: Path, tmp_path: Path) -> None:
    _train(synthetic_store, tmp_path, tmp_path / "a", **{"train.epochs": 1})
    with pytest.raises(CheckpointError, match=r"best checkpoint.*not the training state"):
        _train(synthetic_store, tmp_path, tmp_path / "a", resume=str(tmp_path / "a" / "best.pt"))


def test_resume_into_a_new_folder_keeps_the_best_epoch(
    synthetic_store: Path, tmp_path: Path
) -> None:
    # lr ~ 0 and an EMA that barely moves (BatchNorm statistics included): epoch 1 is the best
    # and no later epoch beats it, so best.pt is never rewritten after the resume.
    extra = {
        "train.lr": 1e-12,
        "train.ema": "true",
        "train.ema_decay": 0.999999,
        "train.ema_warmup": "false",
        "train.evaluate_test": "true",
    }
    _train(synthetic_store, tmp_path, tmp_path / "a", **extra, **{"train.epochs": 2})
    result = _train(
        synthetic_store,
        tmp_path,
        tmp_path / "b",
        resume=str(tmp_path / "a" / "last.pt"),
        **extra,
        **{"train.epochs": 3},
    )
    assert result is not None and result.best_epoch == 1
    assert (tmp_path / "b" / "best.pt").read_bytes() == (tmp_path / "a" / "best.pt").read_bytes()
    assert read_checkpoint(tmp_path / "b" / "last.pt").epoch == 3
    assert result.test is not None and result.test["n"] > 0  # best.pt found and evaluated
    assert read_checkpoint(tmp_path / "a" / "last.pt").epoch == 2  # the old folder untouched


@pytest.mark.parametrize(
    ("key", "value", "shown"),
    [
        ("train.seed", 1, "train.seed 0 -> 1"),
        ("train.lr", 0.01, "train.lr 0.003 -> 0.01"),
        ("train.batch_size", 8, "train.batch_size 16 -> 8"),
        ("augment.enabled", "true", "augment.enabled False -> True"),
    ],
)
def test_resume_with_changed_settings_is_refused(
    synthetic_store: Path, tmp_path: Path, key: str, value: object, shown: str
) -> None:
    _train(synthetic_store, tmp_path, tmp_path / "a", **{"train.epochs": 1})
    before = (tmp_path / "a" / "last.pt").read_bytes()
    with pytest.raises(CheckpointError, match="other settings") as info:
        _train(synthetic_store, tmp_path, tmp_path / "a", resume="auto", **{key: value})
    assert shown in info.value.message and "settings.toml" in str(info.value.fix)
    assert (tmp_path / "a" / "last.pt").read_bytes() == before


def test_extending_epochs_is_allowed_said_and_recorded(
    synthetic_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _train(synthetic_store, tmp_path, tmp_path / "a", **{"train.epochs": 2})
    capsys.readouterr()
    _train(synthetic_store, tmp_path, tmp_path / "a", resume="auto", **{"train.epochs": 3})
    err = capsys.readouterr().err
    assert "train.epochs changed from 2 to 3" in err
    last = read_checkpoint(tmp_path / "a" / "last.pt")
    assert last.epoch == 3 and [row["epoch"] for row in last.history] == [1, 2, 3]
    assert last.settings["train"]["epochs"] == 3
    assert "epochs = 3" in (tmp_path / "a" / "settings.toml").read_text()
    with pytest.raises(CheckpointError, match="already finished 3 epochs"):
        _train(synthetic_store, tmp_path, tmp_path / "a", resume="auto", **{"train.epochs": 2})


def test_last_checkpoint_scores_like_best_with_ema(synthetic_store: Path, tmp_path: Path) -> None:
    # One epoch: best and last are the same epoch, so they must hold the same deploy weights
    # (the EMA) and score the same; last.pt keeps the raw weights apart in its training state.
    extra = {"train.ema": "true", "train.ema_decay": 0.5, "train.epochs": 1}
    _train(synthetic_store, tmp_path, tmp_path / "a", **extra)
    best = read_checkpoint(tmp_path / "a" / "best.pt")
    last = read_checkpoint(tmp_path / "a" / "last.pt")
    assert all(torch.equal(best.model_state[k], last.model_state[k]) for k in best.model_state)
    store = load_store(synthetic_store)
    rt = resolve_runtime(engine_settings(synthetic_store, tmp_path).train)
    scores = [
        evaluate_checkpoint(ckpt, store=store, split="valid", rt=rt, out_dir=None)
        for ckpt in (best, last)
    ]
    assert scores[0]["accuracy"] == scores[1]["accuracy"]
    assert np.allclose(scores[0]["confusion_matrix"], scores[1]["confusion_matrix"])
    assert scores[1]["checkpoint_kind"] == "last"


def test_stale_temp_files_are_removed_on_the_next_start(
    synthetic_store: Path, tmp_path: Path
) -> None:
    _train(synthetic_store, tmp_path, tmp_path / "a", **{"train.epochs": 1})
    stale = tmp_path / "a" / ".last.pt.k1ll3d.tmp"  # what a SIGKILL mid-write leaves
    stale.write_bytes(b"partial")
    other = tmp_path / "a" / ".notes.tmp"  # not ours: left alone
    other.write_text("x")
    _train(synthetic_store, tmp_path, tmp_path / "a", resume="auto", **{"train.epochs": 2})
    assert not stale.exists() and other.exists()


def test_a_run_folder_in_use_is_refused(synthetic_store: Path, tmp_path: Path) -> None:
    folder = tmp_path / "a"
    folder.mkdir()
    with folder_lock(folder, what="run folder"), pytest.raises(CtscanError, match="in use"):
        _train(synthetic_store, tmp_path, folder, **{"train.epochs": 1})
    assert not (folder / "last.pt").exists()


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "ctscan", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_bad_out_paths_are_one_line_and_record_no_run(
    synthetic_store: Path, tmp_path: Path, where: str
) -> None:
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    out = a_file if where == "file" else a_file / "run"
    runs = tmp_path / "runs"
    args = ["train", "--out", str(out)]
    for item in engine_overrides(synthetic_store, runs, **{"tracking.enabled": "true"}):
        args += ["--set", item]
    proc = _cli(*args)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert str(out) in proc.stderr and "choose another run folder" in proc.stderr
    assert a_file.read_text() == "keep me"
    assert not (runs / "mlflow.db").exists()  # no run was started, so none is left RUNNING

    proc = _cli("evaluate", str(tmp_path / "missing.pt"), "--out", str(out))
    assert proc.returncode == 4 and "does not exist" in proc.stderr


def test_evaluate_out_under_a_file(synthetic_store: Path, tmp_path: Path) -> None:
    _train(synthetic_store, tmp_path, tmp_path / "a", **{"train.epochs": 1})
    a_file = tmp_path / "taken.txt"
    a_file.write_text("keep me")
    args = ["evaluate", str(tmp_path / "a" / "best.pt"), "--out", str(a_file / "eval")]
    for item in engine_overrides(synthetic_store, tmp_path / "runs"):
        args += ["--set", item]
    proc = _cli(*args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "report folder" in proc.stderr and str(a_file / "eval") in proc.stderr


def test_a_folder_given_as_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "best.pt").write_bytes(b"x")
    proc = _cli("evaluate", str(tmp_path / "run"))
    assert proc.returncode == 4 and "is a folder, not a checkpoint file" in proc.stderr
    assert str(tmp_path / "run" / "best.pt") in proc.stderr

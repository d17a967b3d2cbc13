"""End to end on the real images pulled through DVC: audit, preprocess, train, evaluate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctscan.data.preprocess import run_preprocess
from ctscan.data.store import load_store
from ctscan.settings import load_settings
from tests.processes import ctscan_in_process

pytestmark = pytest.mark.integration


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    return subprocess.run(
        [sys.executable, "-m", "ctscan", *args], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_split_counts_and_audit_findings(real_store_64: Path) -> None:
    store = load_store(real_store_64)
    assert store.counts == {"train": 613, "valid": 72, "test": 259}
    assert store.split("train").images.shape == (613, 1, 64, 64)
    audit = store.audit()
    assert audit is not None
    assert {split: sum(c.values()) for split, c in audit["counts"].items()} == store.counts
    # The set holds exact duplicates, some across splits, and one picture under two labels.
    assert len(audit["exact_duplicates"]) > 0
    assert len(audit["cross_split_duplicates"]) > 0
    assert len(audit["label_conflicts"]) == 1
    assert audit["bad_files"] == []
    assert (real_store_64 / "audit.json").is_file()
    mean, std = store.spec.mean, store.spec.std
    assert 0.05 < mean < 0.6 and 0.05 < std < 0.5


def test_audit_json_on_stdout(real_raw_dir: Path) -> None:
    report = json.loads(ctscan_in_process("audit", str(real_raw_dir), "--json").stdout)
    counts = {split: sum(c.values()) for split, c in report["counts"].items()}
    assert counts == {"train": 613, "valid": 72, "test": 259}


def test_drop_policy_removes_leaks(real_raw_dir: Path, tmp_path: Path) -> None:
    settings = load_settings(
        [],
        [
            f'paths.raw_dir="{real_raw_dir}"',
            f'paths.processed_dir="{tmp_path / "p"}"',
            "data.image_size=32",
            'data.on_leak="drop"',
        ],
    )
    counts = run_preprocess(settings).counts
    assert counts["train"] < 613 and counts["valid"] < 72 and counts["test"] < 259
    store = load_store(tmp_path / "p")
    train = set(store.split("train").hashes)
    assert not train & set(store.split("test").hashes)
    assert not train & set(store.split("valid").hashes)
    assert store.meta["on_leak"] == "drop" and store.meta["dropped"]


@pytest.mark.slow
def test_train_and_evaluate_end_to_end(real_store_64: Path, tmp_path: Path) -> None:
    common = [
        "--set",
        f'paths.processed_dir="{real_store_64}"',
        "--set",
        f'paths.runs_dir="{tmp_path / "runs"}"',
        "--set",
        "data.image_size=64",
    ]
    proc = _cli(
        "train",
        "--model",
        "cnn_gap",
        "--device",
        "cpu",
        "--epochs",
        "2",  # the best of two epochs is what test and evaluate must both read
        "--out",
        str(tmp_path / "run"),
        "--quiet",
        *common,
        "--set",
        "model.pretrained=false",
        "--set",
        "train.batch_size=64",
        "--set",
        "train.threads=1",  # two pytest workers share the cores (tests/conftest.py)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["test"]["n"] == 259
    assert summary["test"]["leak_free"]["n"] < 259
    assert summary["registered_model"]["version"] >= 1
    evaluated = ctscan_in_process("evaluate", str(tmp_path / "run" / "best.pt"), "--json", *common)
    report = json.loads(evaluated.stdout)
    assert report["n"] == 259 and report["accuracy"] == pytest.approx(summary["test"]["accuracy"])
    assert report["macro_f1"] == pytest.approx(summary["test"]["macro_f1"])
    # A store preprocessed differently is refused, naming the setting.
    proc = _cli(
        "evaluate",
        str(tmp_path / "run" / "best.pt"),
        *common[:2],
        "--set",
        "data.image_size=64",
        "--set",
        'paths.processed_dir="/nonexistent"',
    )
    assert proc.returncode == 3 and "no processed store" in proc.stderr

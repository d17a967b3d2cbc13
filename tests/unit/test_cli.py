"""The CLI: commands listed, exit codes and one-line messages for user mistakes, fast --help."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ctscan import __version__
from ctscan.cli import app
from tests.unit.conftest_store import engine_overrides

runner = CliRunner()


def _run(*args: str) -> tuple[int, str, str]:
    """Run `python -m ctscan` (the real entry point with its error handling)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTSCAN_")}
    proc = subprocess.run(
        [sys.executable, "-m", "ctscan", *args], capture_output=True, text=True, env=env
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_help_lists_the_commands_that_exist() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    panel = result.output.split("Commands")[-1]
    listed = set(re.findall(r"^│ (\S+) ", panel, flags=re.MULTILINE))
    assert listed == {"preprocess", "audit", "train", "evaluate", "settings"}


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"ctscan {__version__}"


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys; from ctscan.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'mlflow', 'pydantic_settings', 'numpy', 'PIL', 'matplotlib')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr


def test_settings_show_resolves_overrides() -> None:
    result = runner.invoke(app, ["settings", "show", "--json", "--set", "train.epochs=3"])
    assert result.exit_code == 0
    assert json.loads(result.output)["train"]["epochs"] == 3


def test_bad_settings_key_is_one_line_exit_2() -> None:
    code, _out, err = _run("settings", "show", "--set", "train.epoch=3")
    assert code == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "train.epoch" in err and "epochs" in err


def test_missing_settings_file_is_an_error() -> None:
    code, _, err = _run("settings", "show", "-s", "no-such-recipe")
    assert code == 2 and "settings file 'no-such-recipe' does not exist" in err


def test_bad_raw_dir_names_the_path_and_the_fix(tmp_path: Path) -> None:
    code, _, err = _run("preprocess", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 3 and "Traceback" not in err
    assert str(tmp_path / "missing") in err and "dvc pull" in err


def test_missing_checkpoint(tmp_path: Path) -> None:
    code, _, err = _run("evaluate", str(tmp_path / "none.pt"))
    assert code == 4 and "does not exist" in err and "ctscan train" in err


def test_cuda_without_gpu_is_a_user_error(synthetic_store: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    args = ["train", "--device", "cuda", "--out", str(tmp_path / "run")]
    for item in engine_overrides(synthetic_store, tmp_path / "runs"):
        if not item.startswith("train.device"):
            args += ["--set", item]
    code, _, err = _run(*args)
    assert code == 1 and "no CUDA device" in err and "--device cpu" in err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "CTSCAN_DEBUG": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "ctscan", "evaluate", str(tmp_path / "none.pt")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_train_then_evaluate_json(synthetic_store: Path, tmp_path: Path) -> None:
    args = ["train", "--out", str(tmp_path / "run"), "--epochs", "2"]
    for item in engine_overrides(synthetic_store, tmp_path / "runs"):
        args += ["--set", item]
    code, out, err = _run(*args)
    assert code == 0, err
    summary = json.loads(out)
    assert summary["epochs_run"] == 2 and Path(summary["best_checkpoint"]).is_file()
    eval_args = ["evaluate", summary["best_checkpoint"], "--json", "--split", "valid"]
    eval_args += [
        "--set",
        f'paths.processed_dir="{synthetic_store}"',
        "--set",
        "tracking.enabled=false",
    ]
    eval_args += ["--set", "data.image_size=32", "--out", str(tmp_path / "eval")]
    code, out, err = _run(*eval_args)
    assert code == 0, err
    report = json.loads(out)
    assert report["split"] == "valid" and 0.0 <= report["accuracy"] <= 1.0
    assert set(report) >= {"accuracy", "macro_f1", "balanced_accuracy", "per_class", "ece"}
    for name in ("confusion_matrix.png", "reliability.png", "worst_errors.png", "evaluation.json"):
        assert (tmp_path / "eval" / name).is_file()
    code, _, err = _run(*eval_args[:3], "--split", "nope", *eval_args[5:])
    assert code == 1 and "split 'nope'" in err


FILE_FAULTS = {
    "zero_byte": "empty.png",
    "truncated": "cut.png",
    "text_as_png": "notes.png",
    "bomb": "bomb.png",
}
TREE_FAULTS = ("empty_class", "missing_split", "file_in_split", "two_folders_one_label")


@pytest.mark.parametrize("variant", sorted(FILE_FAULTS))
def test_bad_files_fail_by_name_or_are_skipped_and_listed(
    make_raw_tree, tmp_path: Path, variant: str
) -> None:
    raw = make_raw_tree(variant)
    out = tmp_path / "store"
    code, _, err = _run("preprocess", str(raw), "--out", str(out), "--quiet")
    assert code == 3 and "Traceback" not in err
    assert FILE_FAULTS[variant] in err and "--on-bad-file skip" in err
    assert not out.exists()  # nothing half-written
    code, _, err = _run(
        "preprocess", str(raw), "--out", str(out), "--quiet", "--on-bad-file", "skip"
    )
    assert code == 0, err
    audit = json.loads((out / "audit.json").read_text())
    assert [Path(b["path"]).name for b in audit["bad_files"]] == [FILE_FAULTS[variant]]


@pytest.mark.parametrize("variant", TREE_FAULTS)
def test_broken_trees_are_one_line_errors(make_raw_tree, tmp_path: Path, variant: str) -> None:
    raw = make_raw_tree(variant)
    code, _, err = _run("preprocess", str(raw), "--out", str(tmp_path / "store"))
    assert code == 3, err
    assert err.count("\n") == 1 and "Traceback" not in err and "Fix:" in err


@pytest.mark.parametrize(
    ("command", "shown"),
    [
        (["train"], "(default: paths.runs_dir/<model>-s<seed>-<time>)"),
        (["evaluate"], "(default: eval-<split>/ beside the checkpoint)"),
        (["preprocess"], "(default: paths.processed_dir)"),
        (["audit"], "(default: paths.raw_dir)"),
    ],
)
def test_help_shows_the_defaults(command: list[str], shown: str) -> None:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    assert shown in " ".join(result.output.replace("│", " ").split())  # not eaten as markup


def test_ctrl_c_outside_training_is_one_line_exit_130(tmp_path: Path) -> None:
    """A KeyboardInterrupt anywhere in a command: `ctscan: interrupted: ...`, exit 130."""
    code = (
        "import sys, ctscan.cli as cli\n"
        "def boom(*a, **k):\n    raise KeyboardInterrupt\n"
        "import ctscan.settings\nctscan.settings.load_settings = boom\n"
        "sys.argv = ['ctscan', 'settings', 'show']\ncli.main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "ctscan: interrupted: stopped by Ctrl-C."

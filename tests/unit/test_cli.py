"""The CLI: commands listed, exit codes and one-line messages for user mistakes, fast --help."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ctscan import __version__
from ctscan.cli import app
from tests.conftest import build_raw_tree
from tests.processes import ctscan_in_process
from tests.unit.conftest_store import engine_overrides, write_synthetic_store

runner = CliRunner()


def _run(*args: str) -> tuple[int, str, str]:
    """Run `python -m ctscan` (the real entry point with its error handling)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTSCAN_")}
    env["COLUMNS"] = "200"  # Rich wraps at 80 columns: a long tmp path (xdist's) split a word
    proc = subprocess.run(
        [sys.executable, "-m", "ctscan", *args], capture_output=True, text=True, env=env
    )
    return proc.returncode, proc.stdout, proc.stderr


def test_help_lists_the_commands_that_exist() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    panel = result.output.split("Commands")[-1]
    listed = set(re.findall(r"^│ (\S+) ", panel, flags=re.MULTILINE))
    assert listed == {
        "preprocess",
        "audit",
        "train",
        "evaluate",
        "calibrate",
        "ensemble",
        "predict",
        "export",
        "profile",
        "serve",
        "sweep",
        "settings",
    }


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


@pytest.mark.parametrize("command", ["evaluate", "calibrate", "export", "ensemble", "predict"])
def test_a_missing_checkpoint_is_refused_before_torch_is_imported(
    command: str, tmp_path: Path
) -> None:
    """The path is checked first (files.model_file), so the error comes in ~0.3 s, not after
    torch's import (2.2-2.7 s)."""
    none = str(tmp_path / "none.pt")
    args = {
        "ensemble": [none, "--out", str(tmp_path / "e" / "e.pt")],
        "predict": [str(tmp_path), "--model", none],
    }.get(command, [none])
    code = (
        "import sys; from ctscan.cli import main\n"
        f"sys.argv = ['ctscan', {command!r}, *{args!r}]\n"
        "try:\n    main()\nexcept SystemExit as exit:\n"
        "    print('EXIT', exit.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "EXIT 4 False" in proc.stdout, proc.stdout + proc.stderr
    assert f"'{none}' does not exist" in proc.stderr


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
    summary = json.loads(ctscan_in_process(*args).stdout)  # success: no interpreter of its own
    assert summary["epochs_run"] == 2 and Path(summary["best_checkpoint"]).is_file()
    eval_args = ["evaluate", summary["best_checkpoint"], "--json", "--split", "valid"]
    eval_args += [
        "--set",
        f'paths.processed_dir="{synthetic_store}"',
        "--set",
        "tracking.enabled=false",
    ]
    eval_args += ["--set", "data.image_size=32", "--out", str(tmp_path / "eval")]
    report = json.loads(ctscan_in_process(*eval_args).stdout)
    assert report["split"] == "valid" and 0.0 <= report["accuracy"] <= 1.0
    assert set(report) >= {"accuracy", "macro_f1", "balanced_accuracy", "per_class", "ece"}
    for name in ("confusion_matrix.png", "reliability.png", "worst_errors.png", "evaluation.json"):
        assert (tmp_path / "eval" / name).is_file()
    code, _, err = _run(*eval_args[:3], "--split", "nope", *eval_args[5:])
    assert code == 1 and "split 'nope'" in err


def test_a_store_without_test_images_trains_and_says_so(tmp_path: Path) -> None:
    """No test figures and a note, not a traceback after training; evaluate: one line."""
    store = write_synthetic_store(tmp_path / "processed", test=0)
    args = ["train", "--out", str(tmp_path / "run"), "--epochs", "1"]
    for item in engine_overrides(store, tmp_path / "runs", **{"tracking.enabled": "false"}):
        args += ["--set", item]
    assert "test split is empty: no test figures" in ctscan_in_process(*args).output
    assert (tmp_path / "run" / "best.pt").is_file()
    assert not (tmp_path / "run" / "eval-test").exists()
    code, _, err = _run(
        "evaluate",
        str(tmp_path / "run" / "best.pt"),
        "--set",
        f'paths.processed_dir="{store}"',
        "--set",
        "data.image_size=32",
        "--set",
        "tracking.enabled=false",
    )
    assert code == 3, err
    assert "Traceback" not in err
    assert "test split of the store" in err and "holds no images" in err and "--split valid" in err


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


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def minimal_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(raw tree, the store `ctscan preprocess` built from it), built once (read-only)."""
    root = tmp_path_factory.mktemp("minimal")
    raw = build_raw_tree(root / "chest-ctscan-images", "minimal")
    code, _, err = _run("preprocess", str(raw), "--out", str(root / "store"), "--quiet")
    assert code == 0, err
    return raw, root / "store"


@pytest.mark.parametrize(
    ("out", "expected"),
    [
        ("notes.txt", "is a file, not a folder"),
        ("notes.txt/store", "lies under"),
        ("notes.txt/a/b/store", "lies under"),
        ("store/meta.json", "is a file, not a folder"),  # a file inside an existing store
        ("/proc/ctscan-no-such-folder/store", "cannot be written"),
        ("/sys/ctscan-no-such-folder/store", "cannot be written"),  # refused even to root
    ],
)
def test_bad_out_paths_are_one_line_exit_3_and_write_nothing(
    minimal_store: tuple[Path, Path], tmp_path: Path, out: str, expected: str
) -> None:
    raw, store = minimal_store
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("precious")
    shutil.copytree(store, work / "store")  # a store preprocess wrote, as if into this folder
    before = _tree_bytes(work)
    target = out if out.startswith("/") else str(work / out)
    code, _, err = _run("preprocess", str(raw), "--out", target, "--quiet")
    assert code == 3, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"'{target}'" in err and expected in err and "Fix:" in err and "--out" in err
    assert _tree_bytes(work) == before  # nothing written, the existing store untouched
    assert sorted(p.name for p in work.iterdir()) == ["notes.txt", "store"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0,
    reason="root writes into a read-only folder: the /sys case above covers an unwritable place",
)
def test_read_only_out_folder_is_one_line_exit_3(make_raw_tree, tmp_path: Path) -> None:
    raw = make_raw_tree("minimal")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        code, _, err = _run("preprocess", str(raw), "--out", str(locked / "store"), "--quiet")
    finally:
        locked.chmod(0o755)
    assert code == 3 and "Traceback" not in err and err.count("\n") == 1, err
    assert str(locked / "store") in err and "cannot be written" in err
    assert list(locked.iterdir()) == []


def test_a_directory_as_settings_file_is_one_line_exit_2(tmp_path: Path) -> None:
    code, _, err = _run("settings", "show", "-s", str(tmp_path))
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert f"'{tmp_path}' is a directory; a TOML file is expected" in err


def test_an_empty_path_setting_is_one_line_exit_2() -> None:
    code, _, err = _run("settings", "show", "--set", "paths.runs_dir=")
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "'paths.runs_dir'" in err and "empty path" in err


def test_preprocess_says_how_many_bad_files_it_skipped(make_raw_tree, tmp_path: Path) -> None:
    raw = make_raw_tree("zero_byte")
    out = tmp_path / "store"
    code, _, err = _run(
        "preprocess", str(raw), "--out", str(out), "--quiet", "--on-bad-file", "skip"
    )
    assert code == 0, err
    assert "1 bad file(s) skipped" in err and "meta.json" in err
    meta = json.loads((out / "meta.json").read_text())
    assert [Path(s["path"]).name for s in meta["skipped"]] == ["empty.png"]


def test_a_bad_flag_value_is_named_by_its_flag() -> None:
    # (the console script maps the SettingsError to exit code 2 and one line; CliRunner keeps it)
    result = runner.invoke(app, ["train", "--epochs", "0", "--set", "tracking.enabled=false"])
    assert getattr(result.exception, "exit_code", None) == 2
    assert "'train.epochs' = 0" in str(result.exception) and "(from --epochs)" in str(
        result.exception
    )
    result = runner.invoke(app, ["train", "--model", "vgg"])
    assert "(from --model)" in str(result.exception)

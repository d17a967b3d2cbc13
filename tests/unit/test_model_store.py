"""Which processed store a command reads, as a user meets it (issue 21, items 4 and 5).

A project folder with the default 160 px store and a tiny recipe with its own store: the
checkpoint trained on the recipe is evaluated, calibrated, exported and ensembled with the
default settings (on the store it was trained on); a checkpoint whose store is gone gets the
`-s RUN/settings.toml` fix, which works when followed; `preprocess` does not replace a store
built with other settings without `--force`; the "no store" fix names the recipe.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ctscan.settings import given_args, is_given, load_settings
from tests.conftest import build_raw_tree

pytestmark = pytest.mark.slow  # about 25 `ctscan` processes on a 45-image tree

RECIPE = """\
[paths]
processed_dir = "outputs/processed-tiny"
[data]
image_size = 32
[model]
name = "cnn_gap"
pretrained = false
[augment]
enabled = false
[train]
device = "cpu"
epochs = 1
batch_size = 16
warmup_epochs = 0
threads = 1
quiet = true
[tracking]
enabled = false
"""
RUN = Path("outputs/runs/tiny")
DEFAULT_META = Path("outputs/processed/meta.json")


def ctscan(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`ctscan ARGS` run in the project folder, as a user types it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTSCAN_")}
    return subprocess.run(
        [sys.executable, "-m", "ctscan", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=project,
    )


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, done.stderr
    return done


def refused(done: subprocess.CompletedProcess[str], code: int = 3) -> str:
    """The one error line of a refused command."""
    assert done.returncode == code, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.startswith("ctscan: error:")]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    return lines[0]


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default store, the recipe's store and a run trained on the recipe."""
    root = tmp_path_factory.mktemp("project")
    build_raw_tree(root / "data" / "chest-ctscan-images", "happy")
    (root / "settings").mkdir()
    (root / "settings" / "tiny.toml").write_text(RECIPE)
    ok(ctscan(root, "preprocess", "-q"))
    ok(ctscan(root, "preprocess", "-s", "tiny", "-q"))
    ok(ctscan(root, "train", "-s", "tiny", "--out", str(RUN)))
    assert (root / RUN / "settings.toml").is_file()  # beside every checkpoint train writes
    return root


def test_a_recipe_checkpoint_works_with_the_default_settings(project: Path) -> None:
    default_meta = (project / DEFAULT_META).read_bytes()
    best = str(RUN / "best.pt")
    report = json.loads(ok(ctscan(project, "evaluate", best, "--json")).stdout)
    assert report["n"] == 13 and report["warnings"] == []
    ok(ctscan(project, "calibrate", best, "--out", str(RUN / "calibrated.pt")))
    ok(ctscan(project, "export", best, "--out", "outputs/tiny.onnx"))
    assert (project / "outputs" / "tiny.onnx").is_file()
    made = ok(ctscan(project, "ensemble", best, "--tta", "hflip", "--out", "outputs/ens/e.pt"))
    assert "warning" not in made.stderr  # its drift reference came from the recipe's store
    assert (project / "outputs" / "ens" / "reference_confidence.json").is_file()
    ok(ctscan(project, "evaluate", "outputs/ens/e.pt", "--json"))
    assert (project / DEFAULT_META).read_bytes() == default_meta  # nothing rebuilt it


def test_a_named_store_that_does_not_fit_says_pass_the_run_settings(project: Path) -> None:
    line = refused(ctscan(project, "evaluate", str(RUN / "best.pt"), "-s", "tiny", "--set",
                          "paths.processed_dir=outputs/processed"))  # fmt: skip
    assert "takes images preprocessed as 32 px" in line and "holds 160 px" in line
    assert line.endswith(
        f"Fix: use the store it was trained on: pass `-s {RUN}/settings.toml` (its run's "
        "settings), or `--set paths.processed_dir=outputs/processed-tiny`."
    )


def test_a_checkpoint_whose_store_is_gone_gets_a_fix_that_works(
    project: Path, tmp_path: Path
) -> None:
    store = project / "outputs" / "processed-tiny"
    shutil.move(store, tmp_path / "kept")
    try:
        settings = f"{RUN}/settings.toml"
        for command in ("evaluate", "export"):  # one condition, one exit code
            line = refused(ctscan(project, command, str(RUN / "best.pt")))
            assert "no processed store is at 'outputs/processed-tiny' (the store it was" in line
            assert "the store at 'outputs/processed' holds 160 px" in line
            assert line.endswith(
                f"`ctscan preprocess -s {settings}`, then run this again with `-s {settings}`."
            )
        ok(ctscan(project, "preprocess", "-s", settings, "-q"))
        ok(ctscan(project, "evaluate", str(RUN / "best.pt"), "-s", settings, "--json"))
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.move(tmp_path / "kept", store)


def test_preprocess_replaces_a_store_of_other_settings_only_with_force(project: Path) -> None:
    out = ["--out", "outputs/p", "-q"]
    ok(ctscan(project, "preprocess", "--set", "data.image_size=24", *out))
    ok(ctscan(project, "preprocess", "--set", "data.image_size=24", *out))  # same: rebuilt
    meta = project / "outputs" / "p" / "meta.json"
    before = meta.read_bytes()
    line = refused(ctscan(project, "preprocess", "--set", "data.image_size=20", *out))
    assert (
        "'outputs/p' was built with other settings (data.image_size: store=24 settings=20)" in line
    )
    assert "--out outputs/p-20" in line and "--force" in line
    assert meta.read_bytes() == before
    ok(ctscan(project, "preprocess", "--set", "data.image_size=20", "--force", *out))
    assert json.loads(meta.read_text())["spec"]["image_size"] == 20


def test_the_no_store_fix_names_the_settings_that_name_the_store(project: Path) -> None:
    empty = project / "fresh"
    (empty / "settings").mkdir(parents=True)
    shutil.copy(project / "settings" / "tiny.toml", empty / "settings")
    line = refused(ctscan(empty, "profile", "-s", "tiny"))
    assert line.endswith("Fix: run `ctscan preprocess -s tiny`.")
    line = refused(ctscan(empty, "train", "--set", "data.image_size=40", "--epochs", "1",
                          "--set", "paths.processed_dir=st"))  # fmt: skip
    assert line.endswith(
        "Fix: run `ctscan preprocess --set data.image_size=40 --set paths.processed_dir=st`."
    )


def test_a_store_of_other_settings_is_never_offered_for_a_rebuild(project: Path) -> None:
    line = refused(ctscan(project, "train", "-s", "tiny", "--set", "data.image_size=28"))
    assert "data.image_size: store=32 settings=28" in line
    assert (
        "`ctscan preprocess -s tiny --set data.image_size=28 --out outputs/processed-tiny-28`, "
        "then add `--set paths.processed_dir=outputs/processed-tiny-28` here" in line
    )


def test_settings_know_what_named_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CTSCAN_PATHS__PROCESSED_DIR", raising=False)
    plain = load_settings()
    assert given_args(plain) == "" and not is_given(plain, "paths.processed_dir")
    given = load_settings([], ["train.lr=0.1", 'paths.processed_dir="a b"', "data.resize=crop"])
    assert given_args(given) == "--set 'paths.processed_dir=\"a b\"' --set data.resize=crop"
    assert is_given(given, "paths.processed_dir") and not is_given(given, "paths.raw_dir")
    monkeypatch.setenv("CTSCAN_PATHS__RAW_DIR", "elsewhere")
    assert is_given(plain, "paths.raw_dir")

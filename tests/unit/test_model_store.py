"""Which processed store a command reads, as a user meets it (issue 21, items 4 and 5).

A project folder with the default 160 px store and a tiny recipe with its own store: the
checkpoint trained on the recipe is evaluated, calibrated, exported and ensembled with the
default settings (on the store it was trained on; these commands run in this process); a
checkpoint whose store is gone gets the `-s RUN/settings.toml` fix, which works when followed;
`preprocess` does not replace a store built with other settings without `--force`; the "no
store" fix names the recipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import Result
from typer.testing import CliRunner

from ctscan.cli import app
from ctscan.data.preprocess import run_preprocess
from ctscan.data.store import _replace_dir, open_model_store
from ctscan.engine.checkpoint import read_checkpoint
from ctscan.errors import DataError
from ctscan.files import folder_lock
from ctscan.settings import given_args, is_given, load_settings
from tests.conftest import build_raw_tree

pytestmark = pytest.mark.slow  # about 20 `ctscan` processes on a 45-image tree

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


def in_process(*args: str) -> Result:
    """`ctscan ARGS` run by Typer in this process, in the working folder (it must exit 0): for
    commands whose output, not their exit, is checked; spares the interpreter that would import
    torch again."""
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    return result


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


@pytest.fixture
def kept(project: Path, tmp_path: Path) -> Iterator[Path]:
    """The run's own store moved aside for the test (and put back after it, whatever the test
    left at its place): where the test may build, break or leave out a store of that name."""
    store, aside = project / "outputs" / "processed-tiny", tmp_path / "kept"
    shutil.move(store, aside)
    try:
        yield aside
    finally:
        shutil.rmtree(store, ignore_errors=True)
        shutil.move(aside, store)


def test_a_recipe_checkpoint_works_with_the_default_settings(here: Path) -> None:
    default_meta = (here / DEFAULT_META).read_bytes()
    best = str(RUN / "best.pt")
    report = json.loads(in_process("evaluate", best, "--json").stdout)
    assert report["n"] == 13 and report["warnings"] == []
    in_process("calibrate", best, "--out", str(RUN / "calibrated.pt"))
    in_process("export", best, "--out", "outputs/tiny.onnx")
    assert (here / "outputs" / "tiny.onnx").is_file()
    made = in_process("ensemble", best, "--tta", "hflip", "--out", "outputs/ens/e.pt")
    assert "warning" not in made.stderr  # its drift reference came from the recipe's store
    assert (here / "outputs" / "ens" / "reference_confidence.json").is_file()
    in_process("evaluate", "outputs/ens/e.pt", "--json")
    assert (here / DEFAULT_META).read_bytes() == default_meta  # nothing rebuilt it


def test_a_named_store_that_does_not_fit_says_which_store_does(project: Path) -> None:
    line = refused(ctscan(project, "evaluate", str(RUN / "best.pt"), "-s", "tiny", "--set",
                          "paths.processed_dir=outputs/processed"))  # fmt: skip
    assert "takes images preprocessed as 32 px" in line and "holds 160 px" in line
    assert line.endswith(  # absolute: RUN/settings.toml names it relative to the project root
        "Fix: use a store that holds its images: pass "
        f"`--set paths.processed_dir={project / 'outputs' / 'processed-tiny'}`."
    )


def test_a_checkpoint_whose_store_is_gone_gets_a_fix_that_works(
    project: Path, kept: Path, here: Path, tmp_path: Path
) -> None:
    store = project / "outputs" / "processed-tiny"
    settings, raw = project / RUN / "settings.toml", project / "data" / "chest-ctscan-images"
    for command in ("evaluate", "export"):  # one condition, one exit code
        line = refused(ctscan(project, command, str(RUN / "best.pt")))
        assert "no processed store is at 'outputs/processed-tiny' (its run's" in line
        assert "the store at 'outputs/processed' holds 160 px" in line
        assert line.endswith(
            f"`ctscan preprocess -s {settings} --set paths.raw_dir={raw} --out {store}`, "
            "then run this again with "
            f"`--set paths.processed_dir={store}`."
        )
    elsewhere = tmp_path / "elsewhere"  # absolute paths: the fix works from any folder
    elsewhere.mkdir()
    ok(ctscan(elsewhere, *shlex.split(line.split("`")[1])[1:], "-q"))
    in_process("evaluate", str(RUN / "best.pt"), "--json")


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


@pytest.fixture
def here(project: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The project folder as the working folder, no CTSCAN_ variables."""
    for key in [k for k in os.environ if k.startswith("CTSCAN_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(project)
    return project


@pytest.fixture
def away(project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty working folder outside the project, no CTSCAN_ variables."""
    for key in [k for k in os.environ if k.startswith("CTSCAN_")]:
        monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_store_of_the_same_name_here_does_not_hide_the_matching_one(
    project: Path, away: Path
) -> None:
    model, own = read_checkpoint(project / RUN / "best.pt"), project / "outputs" / "processed-tiny"
    (away / "outputs" / "processed-tiny").mkdir(parents=True)  # empty: partial, not its store
    assert open_model_store(load_settings(), model).path.resolve() == own
    shutil.rmtree(away / "outputs" / "processed-tiny")
    shutil.copytree(project / "outputs" / "processed", away / "outputs" / "processed-tiny")
    assert open_model_store(load_settings(), model).path.resolve() == own  # 160 px: skipped


def test_given_the_run_settings_elsewhere_the_fix_is_one_absolute_path(
    project: Path, away: Path
) -> None:
    model, run = read_checkpoint(project / RUN / "best.pt"), project / RUN / "settings.toml"
    with pytest.raises(DataError) as err:  # its relative processed_dir is not here
        open_model_store(load_settings([run]), model)
    own = project / "outputs" / "processed-tiny"
    assert "trained on" not in err.value.message, err.value.message
    assert " -s " not in err.value.fix
    assert (
        err.value.fix
        == f"use a store that holds its images: pass `--set paths.processed_dir={own}`."
    )
    settings = load_settings([run], [f"paths.processed_dir={own}"])
    assert open_model_store(settings, model).path == own


def test_a_store_built_where_the_fix_said_is_found(
    project: Path, kept: Path, here: Path, tmp_path: Path
) -> None:
    model, store = (
        read_checkpoint(project / RUN / "best.pt"),
        project / "outputs" / "processed-tiny",
    )
    shutil.copytree(project / "outputs" / "processed", store)  # 160 px under its name
    with pytest.raises(DataError) as err:
        open_model_store(load_settings(), model)
    free = project / "outputs" / "processed-tiny-32"
    assert f"--out {free}`" in err.value.fix and "the store it was trained on" not in str(err)
    shutil.copytree(kept, free)  # as `ctscan preprocess ... --out FREE` does
    try:
        assert open_model_store(load_settings(), model).path.resolve() == free
    finally:
        shutil.rmtree(free)


def test_a_partial_store_gets_a_fix_that_names_its_settings(
    project: Path, kept: Path, here: Path, tmp_path: Path
) -> None:
    model, store = (
        read_checkpoint(project / RUN / "best.pt"),
        project / "outputs" / "processed-tiny",
    )
    shutil.copytree(kept, store)
    (store / "index.json").unlink()
    with pytest.raises(DataError, match="corrupt or partial") as err:
        open_model_store(load_settings(), model)
    run, raw = project / RUN / "settings.toml", project / "data" / "chest-ctscan-images"
    assert (
        err.value.fix
        == f"run `ctscan preprocess -s {run} --set paths.raw_dir={raw} --out {store}` to "
        "rebuild the processed store."
    )


def test_an_ensemble_outside_the_project_finds_its_members_store(project: Path, away: Path) -> None:
    best = project / RUN / "best.pt"
    model = dataclasses.replace(
        read_checkpoint(best), source=away / "e.pt", members=[{"source": str(best)}]
    )
    store = open_model_store(load_settings(), model)
    assert store.path.resolve() == project / "outputs" / "processed-tiny"


def test_a_second_preprocess_into_the_same_store_is_refused(project: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    held = folder_lock(tmp_path, what="x", name=".p.lock")  # as a running preprocess holds it
    with held, pytest.raises(DataError, match="in use by another ctscan process"):
        run_preprocess(load_settings(), project / "data" / "chest-ctscan-images", out, workers=0)
    assert not out.exists()


def test_force_on_a_linked_store_leaves_no_stray_link(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "meta.json").write_text("old")
    (tmp_path / "store").symlink_to(tmp_path / "real")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "meta.json").write_text("new")
    _replace_dir(tmp_path / "new", tmp_path / "store")
    assert (tmp_path / "store" / "meta.json").read_text() == "new"
    assert not (tmp_path / "store").is_symlink() and (tmp_path / "real" / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["real", "store"]

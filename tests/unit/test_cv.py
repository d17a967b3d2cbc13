"""`ctscan train --folds K`: grouped stratified folds, fold runs, out-of-fold selection, test last.

The fold assignment is tested as a pure function (hypothesis); the cross-validation runs the
real training loop on a small synthetic store with a real MLflow SQLite store.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctscan import CLASS_NAMES
from ctscan.data.audit import picture_group_ids
from ctscan.data.folds import grouped_folds, plan_folds
from ctscan.data.store import load_store, write_store
from ctscan.data.transforms import PreprocessSpec
from ctscan.engine.train import run_training
from ctscan.errors import CheckpointError, CtscanError, Interrupted, SettingsError
from ctscan.ops.cv import CV_FILE, FOLD_FILE, FOLDS_FILE, run_cv
from ctscan.settings import DataSettings, load_settings
from tests.processes import ctscan_in_process, ctscan_stopped
from tests.unit.conftest_store import engine_settings, make_split

# ---- the assignment -------------------------------------------------------------------------


@st.composite
def labelled_groups(draw: Any) -> tuple[np.ndarray, np.ndarray, int]:
    n = draw(st.integers(8, 120))
    labels = np.array(draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    n_groups = draw(st.integers(2, n))  # every id used at least once
    extra = draw(st.lists(st.integers(0, n_groups - 1), min_size=n - n_groups, max_size=n))
    groups = np.array(draw(st.permutations(list(range(n_groups)) + extra[: n - n_groups])))
    k = draw(st.integers(2, min(10, n_groups)))
    return labels, groups, k


@given(labelled_groups(), st.integers(0, 2**16))
@settings(max_examples=60, deadline=None)
def test_every_group_lies_in_one_fold_and_every_fold_is_used(
    case: tuple[np.ndarray, np.ndarray, int], seed: int
) -> None:
    labels, groups, k = case
    fold = grouped_folds(labels, groups, k, seed)
    assert fold.shape == labels.shape and set(fold.tolist()) <= set(range(k))
    for g in np.unique(groups):
        assert len(set(fold[groups == g].tolist())) == 1, f"group {g} straddles folds"
    assert len(set(fold.tolist())) == k  # no empty fold
    assert np.array_equal(fold, grouped_folds(labels, groups, k, seed))  # deterministic


@given(st.integers(2, 10), st.integers(0, 1000))
@settings(max_examples=30, deadline=None)
def test_singleton_groups_give_folds_stratified_to_one_image(k: int, seed: int) -> None:
    labels = np.repeat(np.arange(4), [41, 23, 30, 29])
    fold = grouped_folds(labels, np.arange(len(labels)), k, seed)
    for c in range(4):
        per_fold = np.bincount(fold[labels == c], minlength=k)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)


def test_too_few_groups_for_k_is_refused() -> None:
    with pytest.raises(ValueError, match="3 picture groups cannot fill 4 folds"):
        grouped_folds(np.zeros(6, dtype=int), np.array([0, 0, 1, 1, 2, 2]), 4, 0)
    with pytest.raises(ValueError, match="k must be 2 or more"):
        grouped_folds(np.zeros(6, dtype=int), np.arange(6), 1, 0)


def test_exact_and_near_copies_form_one_group() -> None:
    paths = ["train/a.png", "train/b.png", "valid/c.png", "valid/d.png", "train/e.png"]
    hashes = ["h1", "h2", "h1", "h3", "h4"]  # a and c: same pixels
    near = [(("valid/d.png",), ("train/b.png",))]  # d: a re-encoded copy of b
    groups = picture_group_ids(paths, hashes, near)
    assert groups[0] == groups[2] and groups[1] == groups[3]
    assert len(set(groups)) == 3


# ---- a store with copies across train and valid ---------------------------------------------


def _store_with_copies(out: Path) -> Path:
    """16 train and 4 valid images per class; 3 valid images are copies of train ones (exact
    pixels, or a near copy the audit lists), as in the Kaggle set."""
    splits = {
        "train": make_split(16, 32, 0, "train"),
        "valid": make_split(4, 32, 1, "valid"),
        "test": make_split(4, 32, 2, "test"),
    }
    train, valid = splits["train"], splits["valid"]
    for v, t in ((0, 0), (5, 20)):  # exact copies: same pixel hash
        valid.hashes[v] = train.hashes[t]
        valid.images[v] = train.images[t]
    near = {"a": [valid.paths[9]], "b": [train.paths[40]], "same_picture": True}
    # a train and a valid image that are both near copies of one test image: one picture
    chain = [
        {"a": [valid.paths[14]], "b": [splits["test"].paths[13]], "same_picture": True},
        {"a": [splits["test"].paths[13]], "b": [train.paths[60]], "same_picture": True},
    ]
    data = DataSettings(image_size=32).model_dump()
    spec = PreprocessSpec(32, "pad", 0.2, 0.3, CLASS_NAMES)
    return write_store(
        out,
        splits,
        spec=spec,
        data_settings=data,
        raw_dir=None,
        raw_fingerprint="synthetic",
        on_leak="keep",
        audit={"near_duplicates": [near, *chain]},
    )


@pytest.fixture(scope="module")
def copies_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _store_with_copies(tmp_path_factory.mktemp("cv") / "processed")


def test_the_store_folds_keep_copies_together(copies_store: Path) -> None:
    store = load_store(copies_store)
    plan = plan_folds(store, 5, seed=0)
    in_folds = {(int(g), int(f)) for g, f in zip(plan.group, plan.fold, strict=True)}
    assert len(in_folds) == len(set(plan.group.tolist()))  # no group straddles two folds
    where = dict(zip(plan.paths, plan.fold.tolist(), strict=True))
    pairs = [
        ("valid/adenocarcinoma/0.png", "train/adenocarcinoma/0.png"),
        ("valid/large_cell_carcinoma/1.png", "train/large_cell_carcinoma/4.png"),
        ("valid/squamous_cell_carcinoma/1.png", "train/squamous_cell_carcinoma/8.png"),
        ("valid/normal/2.png", "train/normal/12.png"),  # linked through test/normal/1.png
    ]
    group = dict(zip(plan.paths, plan.group.tolist(), strict=True))
    for a, b in pairs:
        assert where[a] == where[b] and group[a] == group[b], (a, b)
    assert plan.to_dict()["images_in_shared_groups"] == 8
    assert "test/normal/1.png" not in plan.paths
    assert plan_folds(store, 5, seed=0).identity == plan.identity
    assert plan_folds(store, 5, seed=1).identity != plan.identity
    with pytest.raises(SettingsError, match="needs 2 to 76 folds here"):
        plan_folds(store, 77, seed=0)


# ---- the cross-validation ------------------------------------------------------------------


def _settings(store: Path, runs: Path, **extra: object) -> Any:
    return engine_settings(store, runs, **{"train.epochs": 2, **extra})


@pytest.mark.slow
def test_cv_trains_k_child_runs_selects_out_of_fold_and_reads_test_last(
    copies_store: Path, mlflow_runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    from ctscan.data.store import Store
    from ctscan.engine.checkpoint import read_checkpoint

    out = mlflow_runs_dir / "cv"
    folds_done_at_first_test: list[list[bool]] = []
    split = Store.split

    def recorded_split(self: Store, name: str) -> Any:
        if name == "test":
            done = [(out / f"fold-{f}" / FOLD_FILE).is_file() for f in (1, 2, 3)]
            done.append((out / "oof.json").is_file())  # and the out-of-fold step
            folds_done_at_first_test.append(done)
        return split(self, name)

    monkeypatch.setattr(Store, "split", recorded_split)
    lines: list[str] = []
    settings_ = _settings(copies_store, mlflow_runs_dir, **{"tracking.enabled": "true"})
    result = run_cv(settings_, 3, out_dir=out, say=lines.append)

    assert folds_done_at_first_test[0] == [True, True, True, True]  # test read last
    folds = json.loads((out / FOLDS_FILE).read_text())
    held = folds["held_out"]
    assert sorted(p for f in held.values() for p in f) == sorted(
        p for s in ("train", "valid") for p in load_store(copies_store).split(s).paths
    )
    for fold in (1, 2, 3):  # no held-out picture in its fold's training data
        run = out / f"fold-{fold}"
        record = json.loads((run / FOLD_FILE).read_text())
        assert record["held_out_images"] == len(held[str(fold)])
        best = read_checkpoint(run / "best.pt")
        assert best.calibration is not None and best.calibration["split"] == "out-of-fold (3 folds)"
        assert best.temperature == result.calibration["temperature"]
    summary = json.loads((out / CV_FILE).read_text())
    assert summary["out_of_fold"]["n"] == 80
    assert set(summary["selection"]) >= {"val_accuracy", "val_macro_f1"}
    assert summary["test"]["n"] == 16 and "averaged_probabilities" in summary["test"]
    assert "oof_accuracy_minus_test" in summary["test"]["gap"]
    assert len(json.loads((out / "oof.json").read_text())) == 80

    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    parent = client.get_run(result.run_id)
    assert parent.data.tags["kind"] == "cv" and "oof_accuracy" in parent.data.metrics
    children = [
        client.get_run(r["mlflow_run_id"]) for r in summary["per_fold"] if r["mlflow_run_id"]
    ]
    assert len(children) == 3
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {result.run_id}
    assert all(c.info.status == "FINISHED" for c in children)
    assert not client.search_registered_models()  # fold models stay out of the registry
    assert lines[-1].startswith("fold 3/3: best epoch")


@pytest.mark.slow
def test_an_interrupted_cv_continues_where_it_stopped(
    copies_store: Path, tmp_path: Path, ctrl_c_in_validation: Callable[[int | None], None]
) -> None:
    ctrl_c_in_validation(3)  # fold 2, epoch 1: Ctrl-C
    settings_ = _settings(copies_store, tmp_path / "runs")
    out = tmp_path / "cv"
    with pytest.raises(Interrupted) as err:
        run_cv(settings_, 3, out_dir=out, say=lambda line: None)
    assert err.value.exit_code == 130
    assert "stopped by Ctrl-C in fold 2 of 3" in err.value.message
    assert f"--folds 3 --out {out}" in err.value.fix
    assert (out / "fold-1" / FOLD_FILE).is_file() and not (out / "fold-2" / FOLD_FILE).exists()
    assert not (out / CV_FILE).exists()
    fold_1 = (out / "fold-1" / FOLD_FILE).stat().st_mtime_ns

    ctrl_c_in_validation(None)
    other = _settings(copies_store, tmp_path / "runs", **{"train.lr": 0.01})
    with pytest.raises(CheckpointError, match=r"other settings: train\.lr 0\.003 -> 0\.01") as e:
        run_cv(other, 3, out_dir=out, say=lambda line: None)
    assert e.value.exit_code == 4  # as a refused `train --resume`
    patience = _settings(copies_store, tmp_path / "runs", **{"train.early_stop_patience": 1})
    with pytest.raises(Exception, match=r"train\.early_stop_patience"):  # one recipe for all folds
        run_cv(patience, 3, out_dir=out, say=lambda line: None)
    with pytest.raises(CheckpointError, match="another cross-validation"):
        run_cv(settings_, 4, out_dir=out, say=lambda line: None)
    with pytest.raises(Exception, match="is a cross-validation folder"):  # a plain run into it
        run_training(settings_, out_dir=out)
    for fold, resume in (("fold-2", "auto"), ("fold-2", None), ("fold-3", None)):  # nor a fold
        with pytest.raises(CtscanError, match=f"is {fold} of the cross-validation") as err:
            run_training(settings_, out_dir=out / fold / ".", resume=resume)
        assert f"--folds 3 --out {out.resolve()} -s" in err.value.fix
    assert not (out / "fold-3").exists()
    record = (out / "fold-1" / FOLD_FILE).read_text()
    (out / "fold-1" / FOLD_FILE).write_text("[1, 2]")  # valid JSON, not ctscan's
    with pytest.raises(Exception, match=r"fold-1.+fold\.json' is not ctscan's") as err:
        run_cv(settings_, 3, out_dir=out, say=lambda line: None)
    assert "delete" in err.value.fix and "fold-1" in err.value.fix
    (out / "fold-1" / FOLD_FILE).write_text(record)
    assert (out / "fold-1" / FOLD_FILE).stat().st_mtime_ns != fold_1
    fold_1 = (out / "fold-1" / FOLD_FILE).stat().st_mtime_ns
    # The continue command the message gives: the folder's own settings.toml.
    lines: list[str] = []
    saved = load_settings([out / "settings.toml"], [])
    result = run_cv(saved, 3, out_dir=out, say=lines.append)
    assert lines[0].startswith("fold 1/3: already trained")
    assert (out / "fold-1" / FOLD_FILE).stat().st_mtime_ns == fold_1  # not trained again
    assert [r["fold"] for r in result.folds] == [1, 2, 3]
    assert result.test is not None and result.calibration is not None  # as the first run set
    reference = json.loads((out / "fold-2" / "reference_confidence.json").read_text())
    assert reference["temperature"] == result.calibration["temperature"]  # serve's drift check
    with pytest.raises(CheckpointError, match="holds a finished cross-validation"):
        run_cv(settings_, 3, out_dir=out, say=lambda line: None)


@pytest.mark.slow
def test_a_cv_stopped_as_its_parent_run_is_created_continues_under_that_parent(
    copies_store: Path, mlflow_runs_dir: Path, stop_as_a_run_is_created: Any
) -> None:
    """Ctrl-C an instant after MLflow created the parent: folds.json records it before the
    stop acts, the message says how to continue, and the continue reopens that parent."""
    from mlflow import MlflowClient

    stop_as_a_run_is_created(True)
    out = mlflow_runs_dir / "cv"
    tracked = _settings(copies_store, mlflow_runs_dir, **{"tracking.enabled": "true"})
    with pytest.raises(Interrupted) as err:
        run_cv(tracked, 3, out_dir=out, say=print)
    assert "stopped by Ctrl-C before the first fold" in err.value.message
    assert f"--folds 3 --out {out} -s {out / 'settings.toml'}" in err.value.fix
    parent_id = json.loads((out / FOLDS_FILE).read_text())["parent_run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    parent = client.get_run(parent_id)
    assert parent.info.status == "KILLED" and parent.data.params["cv.folds"] == "3"
    stop_as_a_run_is_created(False)
    result = run_cv(load_settings([out / "settings.toml"], []), 3, out_dir=out, say=print)
    assert result.run_id == parent_id
    parents = client.search_runs([parent.info.experiment_id], "tags.kind = 'cv'")
    assert [run.info.run_id for run in parents] == [parent_id]
    assert client.get_run(parent_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_cv_continued_in_another_experiment_after_its_parent_was_deleted_stays_together(
    copies_store: Path,
    mlflow_runs_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    ctrl_c_in_validation: Callable[[int | None], None],
) -> None:
    """A deleted parent is started afresh in the new tracking.experiment; the stopped fold's
    run, in the old experiment, is not reopened there (its parent could not nest it): the fold
    continues in a new run under the new parent, tagged with the old run's id."""
    from mlflow import MlflowClient

    from ctscan.engine.tracking import TAG_PARENT_RUN_ID, TAG_RESUMED_FROM

    ctrl_c_in_validation(4)  # fold 2, epoch 2: after fold 2's first last.pt
    out = mlflow_runs_dir / "cv"
    tracked = {"tracking.enabled": "true", "tracking.experiment": '"a"'}
    with pytest.raises(Interrupted):
        run_cv(_settings(copies_store, mlflow_runs_dir, **tracked), 3, out_dir=out, say=print)
    ctrl_c_in_validation(None)
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    old_parent = json.loads((out / FOLDS_FILE).read_text())["parent_run_id"]
    assert client.get_run(old_parent).info.status == "KILLED"  # stopped, not failed
    (stopped,) = client.search_runs(
        [client.get_experiment_by_name("a").experiment_id],
        filter_string=f"attributes.status = 'KILLED' and tags.`{TAG_PARENT_RUN_ID}` = "
        f"'{old_parent}'",
    )
    client.delete_run(old_parent)

    tracked["tracking.experiment"] = '"b"'
    result = run_cv(_settings(copies_store, mlflow_runs_dir, **tracked), 3, out_dir=out, say=print)
    b = client.get_experiment_by_name("b").experiment_id
    parent = client.get_run(result.run_id)
    assert parent.info.experiment_id == b and result.run_id != old_parent
    summary = json.loads((out / CV_FILE).read_text())
    folds = {r["fold"]: client.get_run(r["mlflow_run_id"]) for r in summary["per_fold"]}
    assert folds[1].info.experiment_id != b  # finished in the first attempt: not trained again
    for fold in (2, 3):
        assert folds[fold].info.experiment_id == b
        assert folds[fold].data.tags[TAG_PARENT_RUN_ID] == result.run_id
    assert folds[2].data.tags[TAG_RESUMED_FROM] == stopped.info.run_id
    assert client.get_run(stopped.info.run_id).info.status == "KILLED"  # left as it was


@pytest.mark.slow
def test_a_fold_model_swapped_for_another_folds_is_refused(
    copies_store: Path, tmp_path: Path
) -> None:
    import shutil

    settings_ = _settings(copies_store, tmp_path / "runs", **{"train.evaluate_test": "false"})
    out = tmp_path / "cv"
    run_cv(settings_, 2, out_dir=out, say=lambda line: None)
    (out / CV_FILE).unlink()  # as if stopped before the end
    shutil.copy(out / "fold-1" / "best.pt", out / "fold-2" / "best.pt")
    with pytest.raises(Exception, match="is not the model fold 2 trained") as err:
        run_cv(settings_, 2, out_dir=out, say=lambda line: None)
    assert "fold-2" in err.value.fix


def test_out_may_not_be_the_store_or_the_runs_folder(copies_store: Path, tmp_path: Path) -> None:
    settings_ = _settings(copies_store, tmp_path / "runs")
    for out in (copies_store, copies_store / "cv", tmp_path / "runs"):
        with pytest.raises(Exception, match="choose a folder of its own"):
            run_cv(settings_, 3, out_dir=out, say=lambda line: None)
        with pytest.raises(Exception, match="choose a folder of its own"):
            run_training(settings_, out_dir=out)
    assert sorted(p.name for p in copies_store.iterdir() if p.name.startswith(("cv", "fold"))) == []


def test_cli_mistakes_are_one_line(synthetic_store: Path, tmp_path: Path) -> None:
    base = ["-m", "ctscan", "train", "--set", f'paths.processed_dir="{synthetic_store}"']
    base += ["--set", f'paths.runs_dir="{tmp_path}"', "--set", "tracking.enabled=false"]
    base += ["--set", "data.image_size=32"]
    cases = {
        ("--folds", "1"): "cross-validation needs 2 folds or more",
        ("--folds", "3", "--resume", "auto"): "--resume does not apply to --folds",
        ("--folds", "500"): "needs 2 to",
    }
    for extra, message in cases.items():
        done = subprocess.run(
            [sys.executable, *base, *extra], capture_output=True, text=True, cwd=tmp_path
        )
        assert done.returncode in (1, 2), done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


@pytest.mark.slow
def test_a_cv_stopped_by_sigterm_continues_with_the_command_it_printed(
    copies_store: Path, tmp_path: Path
) -> None:
    """End to end: `ctscan train --folds 2` as a process, a real SIGTERM once fold 1 has saved
    an epoch; the one line's continue command, run as printed (in this process), finishes the
    cross-validation under the same MLflow parent, with no run left RUNNING and the stopped
    fold's epochs logged once each."""
    import shlex
    import signal

    from mlflow import MlflowClient

    from tests.unit.conftest_store import engine_overrides

    runs, out = tmp_path / "runs", tmp_path / "cv"
    extra = {"train.epochs": 4, "tracking.enabled": "true", "train.evaluate_test": "false"}
    args = ["train", "--folds", "2", "--out", str(out)]
    args += [a for item in engine_overrides(copies_store, runs, **extra) for a in ("--set", item)]
    stopped = ctscan_stopped(args, signal.SIGTERM, at=2, cwd=tmp_path)  # fold 1, epoch 2
    err = stopped.stderr
    assert stopped.returncode == 143, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("ctscan: terminated: cross-validation stopped by SIGTERM in fold 1 "), (
        err
    )
    continue_with = shlex.split(line.split("`")[1])
    assert continue_with[:2] == ["ctscan", "train"] and "Traceback" not in err
    ctscan_in_process(*continue_with[1:], cwd=tmp_path)  # as printed; the process was the stop
    assert (out / CV_FILE).is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    every = client.search_runs([client.get_experiment_by_name("ctscan").experiment_id])
    assert {r.info.status for r in every} == {"FINISHED"}  # none RUNNING, none KILLED left over
    (parent,) = [r for r in every if r.data.tags.get("kind") == "cv"]
    folds = [json.loads((out / f"fold-{f}" / FOLD_FILE).read_text()) for f in (1, 2)]
    children = {r.info.run_id: r for r in every if r is not parent}
    assert set(children) == {f["mlflow_run_id"] for f in folds}  # the stopped fold reopened
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent.info.run_id}
    for fold in folds:
        steps = [m.step for m in client.get_metric_history(fold["mlflow_run_id"], "val_loss")]
        assert sorted(steps) == list(range(1, fold["epochs_run"] + 1))

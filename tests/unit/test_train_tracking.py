"""A training run's MLflow record, read back from a real SQLite store."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from ctscan.engine.evaluate import run_evaluation
from ctscan.engine.train import run_training
from tests.unit.conftest_store import engine_settings


@pytest.mark.slow
def test_run_is_tracked_in_mlflow(
    synthetic_store: Path, mlflow_runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    settings = engine_settings(
        synthetic_store, mlflow_runs_dir, **{"tracking.enabled": "true", "train.epochs": 3}
    )
    result = run_training(settings, out_dir=mlflow_runs_dir / "run")
    assert result is not None and result.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["train.epochs"] == "3" and params["model.name"] == "cnn_gap"
    tags = run.data.tags
    for tag in ("git_commit", "data_hash", "device", "torch_version", "precision"):
        assert tag in tags
    assert tags["device"] == "cpu"
    history = client.get_metric_history(result.run_id, "val_macro_f1")
    assert [m.step for m in history] == [1, 2, 3]
    for metric in ("train_loss", "val_loss", "val_accuracy", "lr", "train_images_per_s"):
        assert len(client.get_metric_history(result.run_id, metric)) == 3
    assert run.data.metrics["test_accuracy"] == pytest.approx(result.test["accuracy"])
    assert run.data.metrics["run_train_images_per_s"] == pytest.approx(result.train_images_per_s)
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"settings.toml", "curves.png", "eval-test", "reference_confidence.json"} <= artifacts
    evaluation = {a.path for a in client.list_artifacts(result.run_id, "eval-test")}
    assert {
        "eval-test/evaluation.json",
        "eval-test/confusion_matrix.png",
        "eval-test/reliability.png",
    } <= evaluation
    # `ctscan evaluate` records the same figures and files through the same function.
    evaluated = run_evaluation(settings, result.best_path, split="valid")
    (record,) = client.search_runs([run.info.experiment_id], filter_string="tags.kind = 'evaluate'")
    assert record.data.metrics["valid_macro_f1"] == pytest.approx(evaluated["macro_f1"])
    assert {"valid_ece_uncalibrated", "valid_ece_floor_p95", "temperature"} <= set(
        record.data.metrics
    )
    assert {a.path for a in client.list_artifacts(record.info.run_id, "eval-valid")} >= {
        "eval-valid/evaluation.json"
    }
    version = client.get_model_version_by_alias("ctscan-classifier", "champion")
    assert version.run_id == result.run_id
    assert result.model_version["promoted"] is True
    # The registered model stands on its own: uint8 in, the spec and class names with it.
    import mlflow

    from ctscan.engine.tracking import load_model_spec

    spec = load_model_spec(
        "models:/ctscan-classifier@champion", settings.tracking, settings.paths.runs_dir
    )
    assert (
        spec["class_names"] == spec["preprocess"]["class_names"] and len(spec["class_names"]) == 4
    )
    assert spec["model_name"] == "cnn_gap" and spec["preprocess"]["image_size"] == 32
    # best.pt's temperature travels with the registered model, which returns logits / T.
    from ctscan.engine.checkpoint import read_checkpoint

    best = read_checkpoint(result.best_path)
    assert best.calibration is not None and best.calibration["split"] == "valid"
    assert spec["temperature"] == best.temperature
    assert run.data.metrics["temperature"] == pytest.approx(best.temperature)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{result.run_id}/model")
    batch = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    from ctscan.engine.checkpoint import load_model

    expected = load_model(result.best_path).deployable()(batch)
    assert torch.allclose(model(batch), expected, atol=1e-5)


@pytest.mark.slow
def test_a_resumed_run_continues_its_mlflow_run(
    synthetic_store: Path, mlflow_runs_dir: Path
) -> None:
    from mlflow import MlflowClient

    extra = {"tracking.enabled": "true", "tracking.log_model": "false"}
    first = run_training(
        engine_settings(synthetic_store, mlflow_runs_dir, **extra, **{"train.epochs": 2}),
        out_dir=mlflow_runs_dir / "run",
    )
    again = run_training(
        engine_settings(synthetic_store, mlflow_runs_dir, **extra, **{"train.epochs": 4}),
        out_dir=mlflow_runs_dir / "run",
        resume="auto",
    )
    assert first is not None and again is not None and again.run_id == first.run_id
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    history = client.get_metric_history(first.run_id, "val_loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert client.get_run(first.run_id).info.status == "FINISHED"
    experiment = client.get_experiment(client.get_run(first.run_id).info.experiment_id)
    assert len(client.search_runs([experiment.experiment_id])) == 1


def test_a_run_folder_continued_with_tracking_newly_on_logs_its_params(
    synthetic_store: Path, mlflow_runs_dir: Path
) -> None:
    from mlflow import MlflowClient

    off = {"tracking.enabled": "false", "train.epochs": 1}
    run_training(
        engine_settings(synthetic_store, mlflow_runs_dir, **off), out_dir=mlflow_runs_dir / "r"
    )
    on = {"tracking.enabled": "true", "tracking.log_model": "false", "train.epochs": 2}
    again = run_training(
        engine_settings(synthetic_store, mlflow_runs_dir, **on),
        out_dir=mlflow_runs_dir / "r",
        resume="auto",
    )
    assert again is not None and again.run_id  # a new MLflow run: no earlier one to reopen
    params = (
        MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
        .get_run(again.run_id)
        .data.params
    )
    assert params["train.epochs"] == "2" and params["model.name"] == "cnn_gap"


@pytest.mark.parametrize("where", ["_run_meta", "_log_run_start"])
def test_a_child_run_stopped_at_its_start_is_still_a_child_and_ended(
    synthetic_store: Path, mlflow_runs_dir: Path, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    """A fold or trial interrupted in its first moments: its MLflow run has the parent's tags
    (set at creation, not after the settings are logged) and ends KILLED, not RUNNING."""
    from mlflow import MlflowClient

    import ctscan.engine.train as train_module
    from ctscan.engine.tracking import TAG_PARENT_RUN_ID
    from ctscan.engine.train import RunHooks
    from ctscan.errors import Interrupted

    def stopped(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, where, stopped)
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    parent = client.create_run(client.create_experiment("cv-parent")).info.run_id
    tags = {TAG_PARENT_RUN_ID: parent, "ctscan.cv": "cv3-x", "ctscan.fold": "1"}
    extra = {"tracking.enabled": "true", "tracking.log_model": "false", "train.epochs": 1}
    with pytest.raises(Interrupted):
        run_training(
            engine_settings(synthetic_store, mlflow_runs_dir, **extra),
            out_dir=mlflow_runs_dir / "fold-1",
            hooks=RunHooks(tags),
        )
    (run,) = [
        r
        for e in client.search_experiments()
        for r in client.search_runs([e.experiment_id])
        if r.info.run_id != parent
    ]
    assert run.info.status == "KILLED"
    assert {k: run.data.tags.get(k) for k in tags} == tags


@pytest.mark.slow
def test_a_stop_as_an_epoch_is_saved_keeps_that_epochs_metrics(
    synthetic_store: Path, mlflow_runs_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C right after epoch 2's checkpoints are written: its metrics still reach MLflow
    (the resume starts at epoch 3 and would never log them again)."""
    from mlflow import MlflowClient

    import ctscan.engine.train as train_module
    from ctscan.errors import Interrupted

    save = train_module.save_checkpoints

    def save_then_stop(state: Any, *args: Any, **kwargs: Any) -> None:
        save(state, *args, **kwargs)
        if state.epoch == 2:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(train_module, "save_checkpoints", save_then_stop)
    extra = {"tracking.enabled": "true", "tracking.log_model": "false", "train.epochs": 4}
    settings = engine_settings(synthetic_store, mlflow_runs_dir, **extra)
    with pytest.raises(Interrupted, match="epoch 2"):
        run_training(settings, out_dir=mlflow_runs_dir / "run")
    monkeypatch.setattr(train_module, "save_checkpoints", save)
    again = run_training(settings, out_dir=mlflow_runs_dir / "run", resume="auto")
    assert again is not None
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    for metric in ("val_loss", "train_loss"):
        steps = [m.step for m in client.get_metric_history(again.run_id, metric)]
        assert sorted(steps) == [1, 2, 3, 4], metric


@pytest.mark.slow
def test_a_resume_that_starts_a_new_mlflow_run_records_it_at_once(
    synthetic_store: Path,
    mlflow_runs_dir: Path,
    ctrl_c_in_validation: Callable[[int | None], None],
) -> None:
    """The run's MLflow run was deleted: the resume starts a new one and last.pt names it
    before the first epoch, so a stop before the next last.pt does not make a third run."""
    from mlflow import MlflowClient

    from ctscan.engine.checkpoint import read_checkpoint
    from ctscan.engine.tracking import TAG_RESUMED_FROM
    from ctscan.errors import Interrupted

    extra = {"tracking.enabled": "true", "tracking.log_model": "false"}
    run_dir = mlflow_runs_dir / "run"
    first = run_training(
        engine_settings(synthetic_store, mlflow_runs_dir, **extra, **{"train.epochs": 2}),
        out_dir=run_dir,
    )
    assert first is not None
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    client.delete_run(first.run_id)
    longer = engine_settings(synthetic_store, mlflow_runs_dir, **extra, **{"train.epochs": 4})

    ctrl_c_in_validation(1)  # epoch 3, before its last.pt
    with pytest.raises(Interrupted):
        run_training(longer, out_dir=run_dir, resume="auto")
    last = read_checkpoint(run_dir / "last.pt")
    assert last.epoch == 2 and last.mlflow_run_id not in (None, first.run_id)
    second = client.get_run(str(last.mlflow_run_id))
    assert second.info.status == "KILLED"
    assert second.data.tags[TAG_RESUMED_FROM] == first.run_id
    ctrl_c_in_validation(None)
    again = run_training(longer, out_dir=run_dir, resume="auto")
    assert again is not None and again.run_id == second.info.run_id  # reopened, not a third
    experiment = second.info.experiment_id
    assert [r.info.run_id for r in client.search_runs([experiment])] == [again.run_id]
    steps = [m.step for m in client.get_metric_history(again.run_id, "val_loss")]
    assert sorted(steps) == [3, 4]


def test_a_stop_swallowed_mid_epoch_stops_the_run_at_that_epochs_end(
    synthetic_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM raised where Python drops it (a garbage-collector callback prints "Exception
    ignored" and goes on): the run still stops, after that epoch is saved, exit 143."""
    import ctscan.engine.train as train_module
    from ctscan.engine.checkpoint import read_checkpoint
    from ctscan.errors import Interrupted
    from ctscan.jobs import on_stop

    validate = train_module.validate

    def swallowing_validate(*args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(KeyboardInterrupt):  # dropped where it landed
            on_stop(signal.SIGTERM, None)
        return validate(*args, **kwargs)

    monkeypatch.setattr(train_module, "validate", swallowing_validate)
    settings = engine_settings(synthetic_store, tmp_path / "runs", **{"train.epochs": 3})
    with pytest.raises(Interrupted) as err:
        run_training(settings, out_dir=tmp_path / "run")
    assert err.value.exit_code == 143 and "(epoch 1)" in err.value.message
    assert read_checkpoint(tmp_path / "run" / "last.pt").epoch == 1


def test_resuming_a_finished_run_is_refused_before_any_write(
    synthetic_store: Path, mlflow_runs_dir: Path
) -> None:
    """`--resume auto` of a run that finished with no epoch left to train: one line naming its
    results (exit 4), and nothing written: no second calibration, test or end metrics."""
    from mlflow import MlflowClient

    from ctscan.errors import CheckpointError

    extra = {"tracking.enabled": "true", "tracking.log_model": "false", "train.epochs": 1}
    settings = engine_settings(synthetic_store, mlflow_runs_dir, **extra)
    run_dir = mlflow_runs_dir / "run"
    first = run_training(settings, out_dir=run_dir)
    assert first is not None
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    with pytest.raises(CheckpointError) as err:
        run_training(settings, out_dir=run_dir, resume="auto")
    result = run_dir / "result.json"
    assert err.value.message == f"run '{run_dir}' already finished; its results are in '{result}'."
    assert "--epochs" in str(err.value.fix) and err.value.exit_code == 4
    assert {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")} == before
    client = MlflowClient(tracking_uri=f"sqlite:///{mlflow_runs_dir / 'mlflow.db'}")
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert len(client.get_metric_history(first.run_id, "run_seconds")) == 1
    longer = engine_settings(synthetic_store, mlflow_runs_dir, **{**extra, "train.epochs": 2})
    again = run_training(longer, out_dir=run_dir, resume="auto")  # more epochs: trains on
    assert again is not None and again.run_id == first.run_id and len(again.history) == 2

"""A training run's MLflow record, read back from a real SQLite store."""

from __future__ import annotations

from pathlib import Path

import pytest

from ctscan.engine.train import run_training
from tests.unit.conftest_store import engine_settings


@pytest.mark.slow
def test_run_is_tracked_in_mlflow(synthetic_store: Path, mlflow_runs_dir: Path) -> None:
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
    assert {"settings.toml", "curves.png", "eval-test"} <= artifacts
    evaluation = {a.path for a in client.list_artifacts(result.run_id, "eval-test")}
    assert {
        "eval-test/evaluation.json",
        "eval-test/confusion_matrix.png",
        "eval-test/reliability.png",
    } <= evaluation
    version = client.get_model_version_by_alias("ctscan-classifier", "champion")
    assert version.run_id == result.run_id
    assert result.model_version["promoted"] is True

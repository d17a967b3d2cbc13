"""Pytest fixtures for tests that use a real MLflow SQLite store (a plugin module).

Creating and migrating an MLflow SQLite database takes seconds, so it is done once per session;
every test gets its own copy inside its tmp dir, where `open_tracker` finds it by default.
"""

from __future__ import annotations

import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "CTSCAN_TRACKING__URI")


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated, empty MLflow SQLite database file (created once per session)."""
    pytest.importorskip("mlflow")
    from ctscan.engine.tracking_store import _open_sqlite_store

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    # as open_tracker creates a store: under the lock, the Default experiment beside the file
    _open_sqlite_store(f"sqlite:///{path}", path.parent)
    return path


def copy_mlflow_store(template: Path, runs_dir: Path) -> Path:
    """`runs_dir` (created) holding a copy of the template store as mlflow.db; `runs_dir`."""
    runs_dir.mkdir(parents=True)
    with sqlite3.connect(template) as src, sqlite3.connect(runs_dir / "mlflow.db") as dst:
        src.backup(dst)
    src.close()
    dst.close()
    return runs_dir


@pytest.fixture
def mlflow_runs_dir(
    mlflow_db_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """A runs_dir holding a fresh copy of the migrated store, with no MLflow URI in the env.

    The cwd is the test's tmp dir, so a stray ./mlruns would show up there. After the test any
    run left active is ended and MLflow's process-wide tracking URI is cleared.
    """
    for var in MLFLOW_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    runs_dir = copy_mlflow_store(mlflow_db_template, tmp_path / "runs")
    yield runs_dir
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def stop_as_a_run_is_created(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """`stop_as_a_run_is_created(True)`: a Ctrl-C lands an instant after MLflow creates (or
    reopens) a run, the window where a stop once left runs RUNNING or unrecorded; `(False)`
    puts things back."""
    from ctscan.engine.tracking import MlflowTracker

    start = MlflowTracker.start_run

    def start_then_stop(self: Any, *args: Any) -> Any:
        run = start(self, *args)
        signal.raise_signal(signal.SIGINT)
        return run

    def switch(on: bool) -> None:
        monkeypatch.setattr(MlflowTracker, "start_run", start_then_stop if on else start)

    return switch

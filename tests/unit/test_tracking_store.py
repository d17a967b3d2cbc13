"""The SQLite tracking store: creation under concurrency, broken stores, the Default experiment."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ctscan.engine.tracking import TrackingError, open_tracker
from ctscan.settings import TrackingSettings

SRC_DIR = Path(__file__).resolve().parents[2] / "src"
WORKERS = 4

# Each worker imports mlflow and its SQL store first (seconds), says it is ready, then waits for
# the shared start file so that all of them create the store in the same instant.
WORKER = """
import json, sys, time
from pathlib import Path
import mlflow, mlflow.store.tracking.sqlalchemy_store, alembic.command  # the slow imports first
from ctscan.engine.tracking import open_tracker
from ctscan.settings import TrackingSettings

index, runs_dir, sync = int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
settings = TrackingSettings(uri=sys.argv[4] or None)
(sync / f"ready-{index}").touch()
while not (sync / "go").exists():
    time.sleep(0.005)
with open_tracker(settings, runs_dir=runs_dir, run_name=f"worker-{index}") as tracker:
    tracker.log_metrics({"worker": float(index)}, step=1)
print(json.dumps({"index": index, "run_id": tracker.run_id}))
"""


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "CTSCAN_"))}
    env["PYTHONPATH"] = f"{SRC_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    return env


@pytest.fixture
def fresh_runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An empty runs_dir (no mlflow.db yet); the cwd is a different folder."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "CTSCAN_TRACKING__URI"):
        monkeypatch.delenv(var, raising=False)
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    yield tmp_path / "runs"
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(None)


def _open_at_once(tmp_path: Path, uri: str = "") -> set[str]:
    """WORKERS processes open the store `uri` (default: the SQLite file in runs/) in the same
    instant, each logging one run; the run ids, all of them checked FINISHED in the store."""
    runs_dir, sync = tmp_path / "runs", tmp_path / "sync"
    sync.mkdir()
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), str(runs_dir), str(sync), uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=tmp_path,
        )
        for i in range(WORKERS)
    ]
    deadline = time.monotonic() + 240
    while len(list(sync.glob("ready-*"))) < WORKERS and time.monotonic() < deadline:
        if any(w.poll() is not None for w in workers):
            break
        time.sleep(0.05)
    (sync / "go").touch()
    results = [w.communicate(timeout=240) for w in workers]
    failures = [err[-2000:] for w, (_, err) in zip(workers, results, strict=True) if w.returncode]
    assert not failures, "\n---\n".join(failures)

    run_ids = {json.loads(out.strip().splitlines()[-1])["run_id"] for out, _ in results}
    assert len(run_ids) == WORKERS
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri or f"sqlite:///{runs_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ctscan")
    runs = client.search_runs([experiment.experiment_id])
    assert {r.info.run_id for r in runs} == run_ids
    assert {r.data.metrics["worker"] for r in runs} == {float(i) for i in range(WORKERS)}
    assert all(r.info.status == "FINISHED" for r in runs)
    return run_ids


@pytest.mark.slow  # four processes each import mlflow: 10-30 s on 2 busy cores
def test_processes_creating_a_new_store_at_once_all_succeed(tmp_path: Path):
    _open_at_once(tmp_path)
    assert not (tmp_path / "runs" / "mlflow.db.lock").exists()  # the lock file goes with it


@pytest.mark.slow
def test_processes_creating_a_new_postgres_store_at_once_all_succeed(
    tmp_path: Path, postgres_url: Callable[[str], str]
):
    """A fresh PostgreSQL database: MLflow's migrations run once, under ctscan's advisory lock
    (without it, two processes' Alembic migrations collide)."""
    run_ids = _open_at_once(tmp_path, postgres_url("mlflow_at_once"))
    assert len(run_ids) == WORKERS  # every process logged its own run into the one store


def test_a_new_store_puts_the_default_experiment_beside_the_db(fresh_runs_dir: Path):
    with open_tracker(TrackingSettings(), runs_dir=fresh_runs_dir) as tracker:
        pass
    from mlflow import MlflowClient

    default = MlflowClient(tracking_uri=tracker.uri).get_experiment("0")
    assert default.name == "Default"
    expected = (fresh_runs_dir / "mlartifacts").resolve()
    assert default.artifact_location.startswith("file:///")  # absolute, not ./mlruns
    assert default.artifact_location == f"{expected.as_uri()}/0"
    assert not (Path.cwd() / "mlruns").exists()


@pytest.mark.parametrize("stop", [KeyboardInterrupt, OSError])
def test_a_store_creation_stopped_midway_leaves_no_store_behind(
    fresh_runs_dir: Path, monkeypatch: pytest.MonkeyPatch, stop: type[BaseException]
):
    """Ctrl-C (or a failure) while MLflow migrates a new store: no half-migrated mlflow.db is
    left for every later run to refuse; the next run creates the store afresh. A temp file a
    SIGKILL left behind is cleaned then too."""
    import ctscan.engine.tracking_store as tracking

    db = fresh_runs_dir / "mlflow.db"
    migrated = tracking._missing_tables

    def stopped(engine: object) -> list[str]:
        migrated(engine)  # the tables exist, in the file being built
        raise stop()

    monkeypatch.setattr(tracking, "_missing_tables", stopped)
    with pytest.raises((stop, TrackingError)) as err:
        open_tracker(TrackingSettings(), runs_dir=fresh_runs_dir)
    if err.type is TrackingError:  # not "move it aside": there is nothing to move
        assert err.value.message.startswith(f"cannot create the MLflow store '{db.resolve()}'")
    assert not db.exists()
    assert list(fresh_runs_dir.iterdir()) == []
    (fresh_runs_dir / ".mlflow.db.k1ll3d.tmp").write_bytes(b"half a store")  # a SIGKILL's
    monkeypatch.setattr(tracking, "_missing_tables", migrated)
    with open_tracker(TrackingSettings(), runs_dir=fresh_runs_dir) as tracker:
        tracker.log_metrics({"val_loss": 0.5}, step=1)
    assert sorted(p.name for p in fresh_runs_dir.iterdir()) == ["mlflow.db"]


# --- broken stores -------------------------------------------------------------------------------


def _assert_broken_store_error(error: TrackingError, db: Path) -> None:
    assert str(db) in error.message
    assert f"mv {db} {db}.broken" in error.fix
    assert "tracking.uri" in error.fix


def test_a_file_that_is_not_sqlite_is_a_tracking_error(fresh_runs_dir: Path):
    db = fresh_runs_dir / "mlflow.db"
    fresh_runs_dir.mkdir()
    db.write_bytes(os.urandom(3000))
    with pytest.raises(TrackingError) as info:
        open_tracker(TrackingSettings(), runs_dir=fresh_runs_dir)
    assert "not an SQLite database" in info.value.message
    _assert_broken_store_error(info.value, db.resolve())
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_a_half_migrated_store_is_a_tracking_error(fresh_runs_dir: Path, mlflow_db_template):
    fresh_runs_dir.mkdir()
    db = fresh_runs_dir / "mlflow.db"
    with sqlite3.connect(mlflow_db_template) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
        dst.execute("CREATE TABLE _alembic_tmp_tags (key VARCHAR(250), value VARCHAR(5000))")
    src.close()
    dst.close()
    with pytest.raises(TrackingError) as info:
        open_tracker(TrackingSettings(), runs_dir=fresh_runs_dir)
    assert "_alembic_tmp_tags" in info.value.message and "interrupted" in info.value.message
    _assert_broken_store_error(info.value, db.resolve())


def test_a_store_missing_tables_of_its_schema_version_is_a_tracking_error(
    fresh_runs_dir: Path, mlflow_db_template
):
    fresh_runs_dir.mkdir()
    db = fresh_runs_dir / "mlflow.db"
    with sqlite3.connect(mlflow_db_template) as src, sqlite3.connect(db) as dst:
        src.backup(dst)
        dst.execute("DROP TABLE logged_models")  # the alembic version still says head
    src.close()
    dst.close()
    with pytest.raises(TrackingError) as info:
        open_tracker(TrackingSettings(), runs_dir=fresh_runs_dir)
    assert "lacks tables (logged_models)" in info.value.message
    _assert_broken_store_error(info.value, db.resolve())


@pytest.mark.parametrize("tables", ["all", "none"])
def test_a_store_with_a_bogus_schema_version_is_a_tracking_error(
    fresh_runs_dir: Path, mlflow_db_template, tables
):
    fresh_runs_dir.mkdir()
    db = fresh_runs_dir / "mlflow.db"
    if tables == "all":
        with sqlite3.connect(mlflow_db_template) as src, sqlite3.connect(db) as dst:
            src.backup(dst)
        src.close()
        dst.close()
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS alembic_version (version_num VARCHAR(32))")
        conn.execute("DELETE FROM alembic_version")
        conn.execute("INSERT INTO alembic_version VALUES ('0123456789ab')")
    conn.close()
    with pytest.raises(TrackingError) as info:
        open_tracker(TrackingSettings(), runs_dir=fresh_runs_dir)
    assert "cannot be opened" in info.value.message
    _assert_broken_store_error(info.value, db.resolve())


# --- the lock ------------------------------------------------------------------------------------


def test_without_fcntl_the_store_opens_without_a_lock(mlflow_runs_dir: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # as on Windows: `import fcntl` fails
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker:
        tracker.log_metrics({"val_loss": 0.5}, step=1)
    assert tracker.run_id
    assert not (mlflow_runs_dir / "mlflow.db.lock").exists()


def test_a_lock_held_too_long_is_a_tracking_error(mlflow_runs_dir: Path, monkeypatch):
    import fcntl

    from ctscan.engine import tracking_store

    monkeypatch.setattr(tracking_store, "STORE_LOCK_TIMEOUT_S", 0.3)
    lock = mlflow_runs_dir / "mlflow.db.lock"
    with open(lock, "w") as held:  # another open file description: flock conflicts with it
        fcntl.flock(held, fcntl.LOCK_EX)
        started = time.monotonic()
        with pytest.raises(TrackingError, match="held the lock") as info:
            open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir)
        assert time.monotonic() - started < 10
    assert str(lock.resolve()) in info.value.message
    assert "MLFLOW_TRACKING_URI" not in os.environ
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker:  # released
        pass
    assert tracker.run_id

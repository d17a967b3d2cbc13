"""Several `ctscan sweep` processes share one study and one MLflow store in PostgreSQL.

A real server (conftest_postgres.py); the processes are real `ctscan sweep` commands training on
the synthetic store. One of them is killed with SIGKILL mid-trial: the other runs that trial
again once its heartbeat is stale.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.unit.conftest_store import write_synthetic_store
from tests.unit.test_sweep import needs_optuna, write_base, write_spec

N_TRIALS = 4


def _training(client: Any, number: int) -> bool:
    """Whether trial `number` has its MLflow run (its training has started)."""
    experiment = client.get_experiment_by_name("ctscan")
    query = f"tags.`ctscan.trial` = '{number}'"
    return experiment is not None and bool(client.search_runs([experiment.experiment_id], query))


@needs_optuna
@pytest.mark.slow
def test_two_processes_share_one_postgres_study_and_retry_a_killed_trial(
    postgres_url: Callable[[str], str], tmp_path: Path
) -> None:
    import optuna
    from mlflow import MlflowClient

    study_url, mlflow_url = postgres_url("optuna"), postgres_url("mlflow")
    store = write_synthetic_store(tmp_path / "store", train=8, valid=4, test=4)
    base = write_base(tmp_path, store, tmp_path / "runs", **{"tracking.enabled": "true"})
    spec = write_spec(
        tmp_path,
        base,
        sweep={
            "trials": N_TRIALS,
            "pruning": False,
            "sampler": "random",
            "heartbeat_interval": 1,
            "grace_period": 2,
        },
        fixed={"train.epochs": 3},
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    command = [sys.executable, "-m", "ctscan", "sweep", str(spec), "--storage", study_url]
    command += ["--set", f"tracking.uri={mlflow_url}"]
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    # The test's own client makes MLflow's tables now, before the sweeps start: made while they
    # start, outside the lock under which the sweeps make them, two makers collide in Alembic.
    client = MlflowClient(tracking_uri=mlflow_url)
    client.search_experiments()
    procs = [
        subprocess.Popen(  # cwd: MLflow's default artifact root ./mlruns lands in tmp_path
            command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tmp_path
        )
        for log in logs
    ]
    killed, victim = None, procs[0]
    try:
        deadline = time.monotonic() + 120
        while killed is None and time.monotonic() < deadline and victim.poll() is None:
            time.sleep(0.3)
            try:
                trials = optuna.load_study(study_name="study", storage=study_url).trials
            except KeyError:  # not made yet
                continue
            # Killed early (at most one trial finished), the other process has trials left to
            # start after the grace period: the stale trial is noticed when one starts (on a
            # quiet machine a trial takes about a second; killed later, the other could finish
            # the N trials before the killed one's beats were old enough to count as stopped).
            early = sum(t.state.name == "COMPLETE" for t in trials) <= 1
            for trial in trials:
                mine = trial.user_attrs.get("process") == f"{socket.gethostname()}:{victim.pid}"
                if (
                    early
                    and trial.state.name == "RUNNING"
                    and mine
                    and _training(client, trial.number)
                ):
                    victim.send_signal(signal.SIGKILL)
                    killed = trial
        assert killed is not None, logs[0].read_text()
        assert procs[1].wait(timeout=240) == 0, logs[1].read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    study = optuna.load_study(study_name="study", storage=study_url)
    by_number = {t.number: t for t in study.trials}
    finished = [t for t in study.trials if t.state.name == "COMPLETE"]
    # N in total across both processes (one more at most: each stops after its trial under way)
    assert N_TRIALS <= len(finished) <= N_TRIALS + 1, [t.state.name for t in study.trials]
    assert by_number[killed.number].state.name == "FAIL"
    (retry,) = [t for t in finished if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params
    assert retry.user_attrs["process"] == f"{socket.gethostname()}:{procs[1].pid}"
    ran_by = {t.user_attrs["process"] for t in study.trials}
    assert len(ran_by) == 2  # both processes ran trials
    # MLflow: one parent run; every trial ran once, nested under it (the killed trial's run is
    # left RUNNING: nothing can end a run whose process was killed; its retry is a new run).
    experiment = client.get_experiment_by_name("ctscan").experiment_id
    runs = client.search_runs([experiment])
    (parent,) = [run for run in runs if run.data.tags.get("kind") == "sweep"]
    assert parent.info.status == "FINISHED"
    trial_runs = [run for run in runs if run is not parent]
    numbers = [int(run.data.tags["ctscan.trial"]) for run in trial_runs]
    assert len(numbers) == len(set(numbers))  # no trial ran twice
    assert set(numbers) == {t.number for t in study.trials}  # the killed one too
    assert all(run.data.tags["mlflow.parentRunId"] == parent.info.run_id for run in trial_runs)
    status = {int(run.data.tags["ctscan.trial"]): run.info.status for run in trial_runs}
    assert status.pop(killed.number) == "RUNNING" and set(status.values()) == {"FINISHED"}
    assert study.user_attrs["ctscan.parent_run_id"] == parent.info.run_id

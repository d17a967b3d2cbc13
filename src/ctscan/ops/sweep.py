"""`ctscan sweep`: an Optuna search over settings; each trial is one run of the training loop.

The spec: ops/sweep_spec.py. Every `ctscan sweep` joining the study (SQLite in runs_dir, or a
shared PostgreSQL URL) runs `study.optimize` until `MaxTrialsCallback` counts N finished trials;
a stopped trial is queued again at once, a dead process's by Optuna's heartbeat. Trial folders
and best.toml: <runs_dir>/sweeps/<name>/; MLflow: a parent run with one nested run per trial.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shlex
import socket
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ctscan.errors import CtscanError, Interrupted, SettingsError, say_line
from ctscan.files import database_lock, ensure_dir, folder_lock
from ctscan.jobs import experiment_fix, refused_settings, stopped
from ctscan.ops import sweep_spec
from ctscan.ops.sweep_spec import STORAGE_FORMS, Sweep, prepare, write_recipe
from ctscan.settings import public_dict, toml_value

EXTRA_FIX = "pip install 'ctscan[sweep]'"

# Optuna study and trial attributes, MLflow tags.
ATTR_SPEC = "ctscan.spec"
ATTR_SETTINGS = "ctscan.settings"  # the base settings every trial started from (public_dict)
ATTR_PARENT_RUN = "ctscan.parent_run_id"
ATTR_RUN_DIR = "run_dir"
ATTR_EPOCHS = "epochs"
ATTR_RUN_ID = "mlflow_run_id"
ATTR_PROCESS = "process"  # host:pid of the `ctscan sweep` that ran it
ATTR_ERROR = "error"  # why it failed (a stop, an error): it is queued again
ATTR_STOP = "stop_reason"  # why it was pruned
TAG_SWEEP = "ctscan.sweep"
TAG_TRIAL = "ctscan.trial"
COUNTED = ("COMPLETE", "PRUNED")  # the states `--trials N` counts
SWEPT_PARAMS = ("metric", "direction", "sampler", "seed", "pruning")  # the parent run's sweep.*


class SweepError(CtscanError):
    """A sweep cannot start or go on (the study, its storage, its folder)."""


# ---- the study ----------------------------------------------------------------------------


def _import_optuna() -> Any:
    """optuna, quiet (our own lines say what each trial did); a missing extra is one line."""
    try:
        import optuna
    except ImportError as exc:
        raise SweepError(
            f"`ctscan sweep` needs optuna, which cannot be imported ({exc}).", EXTRA_FIX
        ) from None
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # not a failed trial's traceback
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@contextlib.contextmanager
def storage_errors(sweep: Sweep) -> Iterator[None]:
    """A storage that cannot be reached or used is one SweepError line."""
    import sqlalchemy.exc
    from optuna.exceptions import StorageInternalError

    try:
        yield
    except (sqlalchemy.exc.SQLAlchemyError, StorageInternalError) as exc:
        cause = exc.__cause__ if isinstance(exc, StorageInternalError) else exc
        reason = " ".join(str(getattr(cause, "orig", None) or cause).split())[:300]
        raise SweepError(
            f"cannot use the Optuna storage '{sweep.where}': {reason}",
            f"check that the database is up and the URL is right ({STORAGE_FORMS}); finished "
            f"trials are kept: rerun `{sweep.command}` once it answers.",
        ) from None


def study_lock(sweep: Sweep) -> contextlib.AbstractContextManager[None]:
    """Make, load and check the study and its parent run one process at a time: a folder lock
    beside a SQLite file, a PostgreSQL advisory lock per study (both die with the process)."""
    if sweep.db is not None:
        folder = ensure_dir(sweep.db.parent, what="Optuna storage folder", error=SweepError)
        return folder_lock(
            folder, what="Optuna storage", error=SweepError, wait=600, name=sweep.db.name + ".lock"
        )
    return database_lock(
        sweep.storage_url,
        f"ctscan.sweep {sweep.name}",
        what=f"the Optuna storage '{sweep.where}'",
        error=SweepError,
        fix=f"{EXTRA_FIX} (psycopg 3), and write the URL as postgresql+psycopg://...",
    )


def open_study(optuna: Any, sweep: Sweep) -> Any:
    """Create or load the study (under `study_lock`), refusing a changed spec or settings; the
    process that makes it samples with the spec's seed, any other with its own."""
    spec = sweep.spec
    sqlite = {"connect_args": {"timeout": 60}} if sweep.db else {"pool_pre_ping": True}
    storage = optuna.storages.RDBStorage(
        sweep.storage_url,
        engine_kwargs=sqlite,
        heartbeat_interval=spec.heartbeat_interval,
        grace_period=spec.grace_period,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
    )
    pruner = optuna.pruners.MedianPruner(  # on the per-epoch metric; steps are epochs, 1-based
        n_startup_trials=spec.pruning_startup_trials,
        n_warmup_steps=spec.pruning_warmup_epochs + 1,  # epochs 1..warmup are never pruned
    )
    study = optuna.create_study(
        study_name=sweep.name,
        storage=storage,
        direction=spec.direction,
        pruner=pruner if spec.pruning else optuna.pruners.NopPruner(),
        load_if_exists=True,
    )
    identity = json.loads(json.dumps(sweep.identity()))
    recorded = study.user_attrs.get(ATTR_SPEC)
    new = recorded is None and not study.trials
    seed = spec.seed if new else None  # TPE with the constant liar: running trials count
    study.sampler = (
        optuna.samplers.RandomSampler(seed=seed)
        if spec.sampler == "random"
        else optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=spec.tpe_startup_trials, constant_liar=True
        )
    )
    if new and sweep.folder.is_dir() and any(sweep.folder.glob("trial-*")):
        raise SweepError(  # a new study never writes into an older one's trial folders
            f"the sweep folder '{sweep.folder}' holds trials of an earlier study named "
            f"'{sweep.name}' that '{sweep.where}' does not have.",
            "move that folder aside, or pass another --name.",
        )
    if new:
        study.set_user_attr(ATTR_SETTINGS, json.loads(json.dumps(public_dict(sweep.settings))))
        study.set_user_attr(ATTR_SPEC, identity)  # last: a study with it is whole
        return study
    if recorded is None:
        raise SweepError(
            f"study '{sweep.name}' in '{sweep.where}' was not made by `ctscan sweep`.",
            "pass another --name.",
        )
    if recorded != identity:
        old, now = sweep_spec.dotted_keys(recorded), sweep_spec.dotted_keys(identity)
        changed = [
            f"{k}: {old.get(k)!r} -> {now.get(k)!r}"
            for k in sorted(old.keys() | now.keys())
            if old.get(k) != now.get(k)
        ]
        raise SweepError(
            f"study '{sweep.name}' in '{sweep.where}' was made from another spec "
            f"({'; '.join(changed[:4])}{'; ...' if len(changed) > 4 else ''}).",
            f"rerun with the spec (and base settings) it was made from, or start a new study: "
            f"--name {sweep.name}-2 (or delete this one: optuna delete-study --storage "
            f"{shlex.quote(sweep.where if sweep.db is None else sweep.storage_url)} "
            f"--study-name {sweep.name}).",
        )
    # New trials that would train otherwise (defaults, CTSCAN_*, --set) than the study's
    # earlier ones are refused, as a resumed run compares its settings.
    own = (*(p.key for p in spec.params), *sweep.forced())
    refused = refused_settings(study.user_attrs[ATTR_SETTINGS], sweep.settings, may_change=own)
    if refused:
        sets = " ".join("--set " + shlex.quote(f"{k}={toml_value(old)}") for k, old, _ in refused)
        changes = "; ".join(f"{key} {old!r} -> {new!r}" for key, old, new in refused)
        raise SweepError(
            f"study '{sweep.name}' in '{sweep.where}': its trials ran with other settings than "
            f"a new trial would get ({changes}), from ctscan's defaults, CTSCAN_* variables or "
            "--set.",
            f"continue with those values ({sets}), or start a new study: --name {sweep.name}-2.",
        )
    return study


def finished(study: Any) -> int:
    """How many trials of the study count toward `--trials N`: complete and pruned ones."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=[TrialState[s] for s in COUNTED]))


# ---- one trial ----------------------------------------------------------------------------


def _pruned(trial: Any, reason: str) -> None:
    import optuna

    trial.set_user_attr(ATTR_STOP, reason)
    raise optuna.TrialPruned(reason)


def run_trial(sweep: Sweep, trial: Any, parent_run_id: str | None) -> float:
    """Train one trial: its value, or `TrialPruned` (by the median rule, or its own settings
    refused or diverged: those count as finished, as pruned trials, with the reason)."""
    from ctscan.engine.train import RunHooks, run_training

    values = {param.key: param.suggest(trial) for param in sweep.spec.params}
    trial.set_user_attr(ATTR_ERROR, None)  # a retry's copy of the failed trial's reason
    run_dir = sweep.folder / f"trial-{trial.number:04d}"
    trial.set_user_attr(ATTR_RUN_DIR, str(run_dir))
    trial.set_user_attr(ATTR_PROCESS, f"{socket.gethostname()}:{os.getpid()}")
    try:
        settings = sweep.trial_settings(values)
    except SettingsError as exc:  # e.g. augment.scale_min above the scale_max drawn
        _pruned(trial, "settings refused: " + exc.message.split(": ", 1)[-1])
    metric, pruned = sweep.spec.metric, []

    def on_epoch(row: dict[str, Any]) -> str | None:  # report; stop when the median rule says
        epoch, value = int(row["epoch"]), float(row[metric])
        trial.report(value, step=epoch)
        # Pruning after the last epoch would save nothing: a finished trial tells TPE more.
        if epoch < settings.train.epochs and trial.should_prune():
            pruned.append(epoch)
            return (
                f"pruned: {metric} {value:.4f} at epoch {epoch} is worse than the median "
                "of the earlier trials at that epoch"
            )
        return None

    tags = {TAG_SWEEP: sweep.name, TAG_TRIAL: str(trial.number)}
    hooks = RunHooks(tags, parent_run_id=parent_run_id, on_epoch=on_epoch)
    result = run_training(settings, out_dir=run_dir, hooks=hooks)
    assert result is not None  # one process: rank 0
    trial.set_user_attr(ATTR_EPOCHS, len(result.history))
    if result.run_id:
        trial.set_user_attr(ATTR_RUN_ID, result.run_id)
    if pruned:
        _pruned(trial, f"pruned at epoch {len(result.history)}")
    values = [float(row[metric]) for row in result.history if not math.isnan(float(row[metric]))]
    if not values:
        _pruned(trial, f"{metric} was NaN at every epoch")
    return max(values) if sweep.spec.direction == "maximize" else min(values)


class _Trials:
    """`study.optimize`'s objective and callback in this process: run, count and say trials."""

    def __init__(self, sweep: Sweep, tracker: Any, say: Callable[[str], None]) -> None:
        self.sweep, self.tracker, self.say = sweep, tracker, say
        self.ran, self.current = 0, None

    def objective(self, trial: Any) -> float:
        self.current = trial.number
        try:
            return run_trial(self.sweep, trial, self.tracker.run_id)
        except (Exception, KeyboardInterrupt) as exc:
            import optuna

            if not isinstance(exc, optuna.TrialPruned):  # why it failed, for the table
                stop = isinstance(exc, KeyboardInterrupt | Interrupted)
                error = "stopped" if stop else str(exc).split("\n")[0][:300]
                trial.set_user_attr(ATTR_ERROR, error)
            raise

    def announce(self, study: Any, trial: Any) -> None:
        row = _trial_row(trial)
        self.ran += trial.state.name in COUNTED
        self.say(trial_line(row, self.sweep.spec.metric))
        if row["value"] is not None:
            self.tracker.log_metrics({self.sweep.spec.metric: row["value"]}, step=row["number"])

    def retry_failed(self, optuna: Any, study: Any) -> None:
        """Queue again the trial this process ran when it stopped, as the heartbeat would."""
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
            if trial.number == self.current:
                optuna.storages.RetryHeartbeatStaleTrialCallback()(study, trial)


# ---- the whole sweep ----------------------------------------------------------------------


def _trial_row(trial: Any, retried_as: int | None = None) -> dict[str, Any]:
    """One trial for the table and the JSON: number, state, params, value, epochs, seconds."""
    state, attrs, duration = trial.state.name, trial.user_attrs, trial.duration
    notes = []
    if "failed_trial" in trial.system_attrs:
        notes.append(f"retry of {trial.system_attrs['retry_history'][-1]}")
    if state == "FAIL":
        notes.append(attrs.get(ATTR_ERROR) or "its process stopped beating (heartbeat)")
        notes.append(f"runs again as {retried_as}" if retried_as is not None else "runs again")
    elif state == "PRUNED" and ATTR_STOP in attrs:
        notes.append(str(attrs[ATTR_STOP]))
    return {
        "number": trial.number,
        "state": state,
        "params": dict(trial.params),
        "value": trial.value if state in COUNTED else None,
        "epochs": attrs.get(ATTR_EPOCHS, len(trial.intermediate_values)),
        "seconds": round(duration.total_seconds(), 2) if duration is not None else None,
        "run_dir": attrs.get(ATTR_RUN_DIR),
        "mlflow_run_id": attrs.get(ATTR_RUN_ID),
        "process": attrs.get(ATTR_PROCESS),
        "note": "; ".join(notes),
    }


def trial_line(row: dict[str, Any], metric: str) -> str:
    """The line said when a trial finishes."""
    params = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row["params"].items()
    )
    value = f"{metric} {row['value']:.4f}, " if row["value"] is not None else ""
    seconds = f", {row['seconds']:.1f} s" if row["seconds"] is not None else ""
    note = f" ({row['note']})" if row["note"] else ""
    epochs = f"{row['epochs']} epoch" + ("" if row["epochs"] == 1 else "s")
    return f"trial {row['number']} {row['state'].lower()}: {value}{epochs}{seconds}; {params}{note}"


@dataclass
class SweepResult:
    """What a sweep left: its trials, the best one, the recipe written from it."""

    sweep: Sweep
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None = None
    recipe: Path | None = None
    parent_run_id: str | None = None
    ran: int = 0  # trials finished by this command
    seconds: float = 0.0  # this command's trial time
    error: CtscanError | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready, for `--json` and the table."""
        sweep, counts = self.sweep, dict(Counter(row["state"].lower() for row in self.trials))
        return {
            "study": sweep.name,
            "spec": str(sweep.spec.path),
            "optuna_storage": sweep.where,
            "sweep_folder": str(sweep.folder),
            "metric": sweep.spec.metric,
            "direction": sweep.spec.direction,
            "trials_wanted": sweep.n_trials,
            "counts": counts,
            "param_keys": [p.key for p in sweep.spec.params],
            "best": self.best,
            "recipe": str(self.recipe) if self.recipe is not None else None,
            "mlflow_parent_run_id": self.parent_run_id,
            "trials_run_now": self.ran,
            "seconds_now": round(self.seconds, 2),
            "trials_per_hour": round(3600 * self.ran / self.seconds, 1) if self.seconds else None,
            "trials": self.trials,
        }


def _open_parent(sweep: Sweep, study: Any) -> Any:
    """The trials' parent MLflow run, recorded in the study (under `study_lock`)."""
    from ctscan.engine.tracking import open_tracker

    spec = sweep.spec
    params = {f"sweep.{key}": getattr(spec, key) for key in SWEPT_PARAMS}
    params["sweep.settings"] = ", ".join(str(p) for p in sweep.files)
    params |= {f"space.{p.key}": p.describe() for p in spec.params}
    params |= {f"fixed.{key}": value for key, value in spec.fixed.items()}
    return open_tracker(
        sweep.settings.tracking,
        runs_dir=sweep.settings.paths.runs_dir,
        run_name=f"sweep-{sweep.name}",
        recorded_id=study.user_attrs.get(ATTR_PARENT_RUN),
        tags={"kind": "sweep", TAG_SWEEP: sweep.name, "optuna_storage": sweep.where},
        params=params,
        experiment_fix=partial(experiment_fix, new="a new study (--name)"),
        record=lambda run_id: study.set_user_attr(ATTR_PARENT_RUN, run_id),
    )


def run_sweep(
    spec: str | Path,
    *,
    trials: int | None = None,
    name: str | None = None,
    recipe: Path | None = None,
    storage: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    say: Callable[[str], None] = say_line,
) -> SweepResult:
    """Run (or join, or continue) a sweep until its study holds N finished trials; write the
    recipe. The options: `prepare`'s. A stop raises `Interrupted` saying how to continue."""
    sweep = prepare(
        spec, trials=trials, name=name, recipe=recipe, storage=storage, overrides=overrides
    )
    optuna = _import_optuna()
    ensure_dir(sweep.folder, what="sweep folder", error=SweepError)
    study = None
    try:
        with storage_errors(sweep), study_lock(sweep):
            study = open_study(optuna, sweep)
            tracker = _open_parent(sweep, study)  # a refusal comes before any trial runs
    except KeyboardInterrupt as exc:
        raise _stopped(sweep, study, exc) from None
    done = finished(study)
    say(
        f"sweep '{sweep.name}': {done} of {sweep.n_trials} trials finished, "
        f"{max(0, sweep.n_trials - done)} to run; study in {sweep.where}, runs in {sweep.folder}"
    )
    runner = _Trials(sweep, tracker, say)
    t0 = time.perf_counter()
    try:
        with tracker, storage_errors(sweep):
            if done < sweep.n_trials:
                counted = [optuna.trial.TrialState[state] for state in COUNTED]
                study.optimize(
                    runner.objective,
                    callbacks=[
                        optuna.study.MaxTrialsCallback(sweep.n_trials, states=counted),
                        runner.announce,
                    ],
                )
            result = _result(sweep, study, tracker.run_id)
            result.ran, result.seconds = runner.ran, time.perf_counter() - t0
            _log_end(tracker, result)
            return result
    except BaseException as exc:
        with contextlib.suppress(Exception):
            runner.retry_failed(optuna, study)
        if isinstance(exc, KeyboardInterrupt | Interrupted):
            raise _stopped(sweep, study, exc) from None
        raise


def _stopped(sweep: Sweep, study: Any, exc: BaseException) -> Interrupted:
    done = f"{finished(study)} of " if study is not None else "none of "
    return stopped(
        f"sweep '{sweep.name}'",
        exc,
        f" with {done}{sweep.n_trials} trials finished, kept in '{sweep.where}'",
        f"rerun `{sweep.command}` to continue (an interrupted trial starts again).",
    )


def _result(sweep: Sweep, study: Any, parent_run_id: str | None) -> SweepResult:
    trials = study.get_trials(deepcopy=False)
    retries = {
        t.system_attrs["retry_history"][-1]: t.number
        for t in trials
        if "failed_trial" in t.system_attrs
    }
    rows = [_trial_row(t, retries.get(t.number)) for t in trials]
    result = SweepResult(sweep, rows, parent_run_id=parent_run_id)
    complete = [row for row in rows if row["state"] == "COMPLETE"]
    if not complete:
        counts = ", ".join(
            f"{s.lower()} {sum(r['state'] == s for r in rows)}" for s in ("PRUNED", "FAIL")
        )
        result.error = SweepError(
            f"no trial of study '{sweep.name}' completed ({counts}): no recipe was written.",
            "run more trials (a larger --trials), or turn pruning off (pruning = false in "
            "[sweep]); the table says why trials were pruned or failed.",
        )
        return result
    pick = max if sweep.spec.direction == "maximize" else min
    result.best = pick(complete, key=lambda row: row["value"])
    result.recipe = write_recipe(sweep, result.best, sweep.recipe)
    return result


def _log_end(tracker: Any, result: SweepResult) -> None:
    """The parent run's summary: best value, trial counts, the recipe and the trials table."""
    metrics = {f"trials_{state}": float(n) for state, n in result.summary()["counts"].items()}
    if result.best is not None:
        metrics[f"best_{result.sweep.spec.metric}"] = result.best["value"]
        tracker.set_tags({"best_trial": str(result.best["number"])})
    tracker.log_metrics(metrics, step=len(result.trials))
    if result.recipe is not None:
        tracker.log_artifact(result.recipe)
    tracker.log_dict(result.summary(), "sweep.json")

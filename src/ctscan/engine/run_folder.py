"""A run folder: where a run writes, what it continues, what it refuses, the line it stops with.

`plan_run` refuses, before any write, what would lose work or mix runs; `open_run_dir` prepares
the folder under its lock.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from ctscan.data.store import Store
from ctscan.engine.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from ctscan.errors import CheckpointError, CtscanError, Interrupted
from ctscan.files import atomic_write, remove_stale_temps
from ctscan.jobs import changed_settings, refused_changes, stopped
from ctscan.settings import Settings

CHECKPOINT_NAMES = ("best.pt", "last.pt")
RESULT_FILE = "result.json"  # a finished run's summary: written last, once its end is logged


@dataclass
class RunPlan:
    """Where a run writes, and the last.pt it continues (None for a fresh run)."""

    run_dir: Path
    resume_from: Checkpoint | None = None
    notes: list[str] = field(default_factory=list)  # said once the run starts


def _default_run_dir(settings: Settings) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return settings.paths.runs_dir / f"{settings.model.name}-s{settings.train.seed}-{stamp}"


def _resume_path(resume: str | None, out_dir: Path | None, settings: Settings) -> Path | None:
    """The checkpoint `--resume` names, or None for a fresh run."""
    if resume is None:
        return None
    if resume != "auto":
        return Path(resume)
    if out_dir is not None:
        last = out_dir / "last.pt"
        return last if last.is_file() else None
    runs = sorted(
        settings.paths.runs_dir.glob(f"{settings.model.name}-s{settings.train.seed}-*/last.pt"),
        key=lambda p: p.stat().st_mtime,
    )
    return runs[-1] if runs else None


def check_resume(checkpoint: Checkpoint, settings: Settings, store: Store) -> list[str]:
    """Refuse a resume that would not continue the same run; return what it changes, said."""
    path = checkpoint.source
    if not checkpoint.resumable:
        raise CheckpointError(
            f"'{path}' is a {checkpoint.kind} checkpoint: it holds the weights to deploy, not the "
            "training state a run continues from.",
            f"resume from last.pt (e.g. --resume {Path(path or '.').parent / 'last.pt'}) or "
            "--resume auto --out RUN_FOLDER.",
        )
    if checkpoint.model_name != settings.model.name:
        raise CheckpointError(
            f"checkpoint '{path}' holds a {checkpoint.model_name} model, "
            f"but model.name is {settings.model.name}.",
            f"resume with --model {checkpoint.model_name} or start a new run.",
        )
    if checkpoint.spec != store.spec:
        raise CheckpointError(
            f"checkpoint '{path}' was trained on another processed store "
            f"({checkpoint.spec.to_dict()} vs {store.spec.to_dict()}).",
            "preprocess with the settings of that run, or start a new run.",
        )
    changed = changed_settings(checkpoint.settings, settings)
    # A resumed run (one model) may also extend its schedule.
    schedule = ("train.epochs", "train.early_stop_patience")
    if refused := refused_changes(checkpoint.settings, settings, may_change=schedule):
        settings_file = Path(path or ".").parent / "settings.toml"
        raise CheckpointError(
            f"resuming '{path}' with other settings than the run used: {'; '.join(refused)}. "
            "A resumed run continues the same schedule, model and data.",
            f"resume with the run's own settings (-s {settings_file}), or start a new run with "
            "these settings.",
        )
    if settings.train.epochs < checkpoint.epoch:
        raise CheckpointError(
            f"train.epochs is {settings.train.epochs}, but '{path}' has already finished "
            f"{checkpoint.epoch} epochs.",
            f"pass --epochs {checkpoint.epoch} or more.",
        )
    notes = []
    for key, old, new in changed:
        if key == "train.epochs":
            notes.append(
                f"train.epochs changed from {old} to {new}: the learning-rate schedule now ends "
                f"at epoch {new}"
            )
        elif not key.startswith(("paths.", "tracking.")):
            notes.append(f"{key} changed from {old!r} to {new!r}")
    return notes


def _refuse_finished_run(run_dir: Path, checkpoint: Checkpoint, settings: Settings) -> None:
    """A run that finished (its RESULT_FILE written) with no epoch left to train: resuming it
    would only calibrate, test and log its end again."""
    tr, result = settings.train, run_dir / RESULT_FILE
    patience = tr.early_stop_patience
    stopped_early = patience and checkpoint.epoch - checkpoint.best_epoch >= patience
    if result.is_file() and (tr.epochs <= checkpoint.epoch or stopped_early):
        raise CheckpointError(
            f"run '{run_dir}' already finished; its results are in '{result}'.",
            f"start a new run (another --out), or train it on with more epochs than "
            f"{checkpoint.epoch} (--epochs; a larger train.early_stop_patience if it stopped "
            "early).",
        )


def write_result(run_dir: Path, summary: dict) -> None:
    """The run finished: its summary in RESULT_FILE."""
    atomic_write(run_dir / RESULT_FILE, (json.dumps(summary, indent=2) + "\n").encode())


def refuse_reserved_out(out: Path, settings: Settings) -> None:
    """A run (or cross-validation) folder is never the processed store, inside it, the runs
    folder itself, or a cross-validation folder (for a plain run): preprocess would delete it,
    or its files would mix with others'."""
    target = Path(out).resolve()
    store = Path(settings.paths.processed_dir).resolve()
    reserved = {
        store: "the processed store (ctscan preprocess replaces that folder)",
        Path(settings.paths.runs_dir).resolve(): "the runs folder itself (paths.runs_dir)",
    }
    what = reserved.get(target)
    if what is None and store in target.parents:
        what = "inside the processed store (ctscan preprocess replaces that folder)"
    if what is not None:
        raise CtscanError(
            f"--out '{out}' is {what}.", "choose a folder of its own, e.g. under paths.runs_dir."
        )


def _refuse_finished_folder(run_dir: Path) -> None:
    """A fresh run never overwrites another run's checkpoints or a cross-validation."""
    if (run_dir / "folds.json").exists():
        raise CtscanError(
            f"'{run_dir}' is a cross-validation folder (folds.json).",
            f"continue it with `ctscan train --folds K --out {run_dir}`, or choose another --out.",
        )
    if (run_dir / "last.pt").exists():
        raise CtscanError(
            f"run folder '{run_dir}' already holds a checkpoint (last.pt).",
            "pass --resume auto to continue that run, or choose another --out.",
        )


def refuse_fold_folder(run_dir: Path) -> None:
    """A plain run never trains in a cross-validation's fold folder: it would train on the
    store's train and valid splits, not the fold's, and the cross-validation would then take
    that model as the fold's (its held-out images seen in training)."""
    fold = Path(run_dir).resolve()
    cv_dir = fold.parent
    if not (re.fullmatch(r"fold-\d+", fold.name) and (cv_dir / "folds.json").is_file()):
        return
    try:
        k = int(json.loads((cv_dir / "folds.json").read_text())["k"])
    except (OSError, ValueError, KeyError, TypeError):
        k = "K"
    raise CtscanError(
        f"'{run_dir}' is {fold.name} of the cross-validation '{cv_dir}' (folds.json): a plain "
        "run would train it on the store's train and valid splits, not on its fold's.",
        f"continue the cross-validation with `ctscan train --folds {k} --out {cv_dir} -s "
        f"{cv_dir / 'settings.toml'}`, or choose another --out.",
    )


def plan_run(
    settings: Settings,
    out_dir: Path | None,
    resume: str | None,
    store: Store,
    *,
    fold: bool = False,
) -> RunPlan:
    """Decide the run folder and the checkpoint to resume; refuse what would lose work."""
    resume_path = _resume_path(resume, out_dir, settings)
    run_dir = out_dir or (resume_path.parent if resume_path else _default_run_dir(settings))
    if not fold:
        refuse_fold_folder(run_dir)
    if resume_path is None:
        refuse_reserved_out(run_dir, settings)
        notes = [f"--resume auto: no last.pt in {run_dir}, starting a new run"] if resume else []
        _refuse_finished_folder(run_dir)
        return RunPlan(run_dir=run_dir, notes=notes)
    checkpoint = read_checkpoint(resume_path)
    notes = [f"resumed from {resume_path} at epoch {checkpoint.epoch + 1}"]
    notes += check_resume(checkpoint, settings, store)
    if not fold:  # a fold's cross-validation knows its finished folds (fold.json)
        _refuse_finished_run(resume_path.parent, checkpoint, settings)
    if run_dir.resolve() != resume_path.parent.resolve():
        if (run_dir / "last.pt").exists():
            raise CtscanError(
                f"run folder '{run_dir}' already holds a checkpoint (last.pt); resuming "
                f"'{resume_path}' into it would overwrite it.",
                "choose another --out, or resume that folder's own last.pt.",
            )
        notes.append(f"continuing '{resume_path}' in the new run folder '{run_dir}'")
    return RunPlan(run_dir=run_dir, resume_from=checkpoint, notes=notes)


def open_run_dir(plan: RunPlan) -> None:
    """Under the folder's lock: clean temp files a killed writer left, bring the run's best.pt."""
    if plan.resume_from is None:  # another run may have written it since `plan_run`
        _refuse_finished_folder(plan.run_dir)
    remove_stale_temps(plan.run_dir, CHECKPOINT_NAMES)
    source = plan.resume_from.source if plan.resume_from is not None else None
    if source is None or source.parent.resolve() == plan.run_dir.resolve():
        return
    best = source.parent / "best.pt"
    if best.is_file():  # the best epoch so far may never be beaten after the resume
        atomic_write(plan.run_dir / "best.pt", best.read_bytes())
    elif plan.resume_from is not None and plan.resume_from.best_epoch:
        raise CheckpointError(
            f"'{best}' is missing: the run's best epoch ({plan.resume_from.best_epoch}) would "
            "be lost by resuming into another folder.",
            f"restore it, or resume in the run's own folder (--out {source.parent}).",
        )


def record_new_run(plan: RunPlan, run_id: str) -> None:
    """A resumed run whose MLflow run could not be reopened (not in this store, deleted) got a
    new one: last.pt names it at once, so a stop before the next last.pt does not start a
    third run at the next resume."""
    assert plan.resume_from is not None
    checkpoint = dataclasses.replace(plan.resume_from, mlflow_run_id=run_id)
    save_checkpoint(plan.run_dir / "last.pt", checkpoint)


def run_stopped(
    run_dir: Path, exc: BaseException, finished: int = 0, every: int = 1
) -> Interrupted:
    """The one line a stopped run ends with: where its last checkpoint is, how to resume.
    `finished`: the epochs this run had finished; `every`: train.checkpoint_every."""
    last = run_dir / "last.pt"
    try:
        epoch = read_checkpoint(last).epoch if last.is_file() else 0
    except CtscanError:
        epoch = 0
    if not epoch and not finished:
        where = f" before the first epoch ended; nothing was saved in '{run_dir}'"
        return stopped("training", exc, where, "start the run again.")
    if not epoch:
        best = (
            " (best.pt, the best epoch so far, is kept)" if (run_dir / "best.pt").is_file() else ""
        )
        return stopped(
            "training",
            exc,
            f" after {finished} epochs, before its first last.pt (written every {every} epochs, "
            f"train.checkpoint_every): the run cannot be resumed{best}",
            f"start the run again (--out {run_dir}); a smaller train.checkpoint_every lets a "
            "stopped run resume.",
        )
    lost = f"; epochs {epoch + 1}-{finished} since are lost" if finished > epoch else ""
    return stopped(
        "training",
        exc,
        f"; the last checkpoint is '{last}' (epoch {epoch}){lost}",
        f"continue with `ctscan train --resume auto --out {run_dir}` and the same settings "
        f"(-s {run_dir / 'settings.toml'}).",
    )

"""`ctscan ensemble`: several checkpoints (and test-time flips) written as one checkpoint.

An ordinary best.pt (model_name "ensemble", its members and flips recorded), so every command
that takes a checkpoint takes it; serve's drift reference goes beside it (docs/ensemble.md).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ctscan.data.reference import CONFIDENCE_FILE
from ctscan.errors import CheckpointError, CtscanError
from ctscan.files import checkpoint_file_problem, ensure_dir, file_sha256, folder_lock, model_file

RUN_FILES = ("best.pt", "last.pt")
FOLD = re.compile(r"fold-[0-9]+")  # a cross-validation's fold folders (ops/cv.py)


@dataclass
class EnsembleResult:
    """What `ctscan ensemble` wrote."""

    checkpoint: Path
    members: list[dict[str, Any]]
    flips: tuple[str, ...]
    reference: Path | None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (`--json`)."""
        return json.loads(json.dumps(asdict(self), default=str))


def member_paths(sources: list[Path]) -> list[Path]:
    """The checkpoint files the arguments name (a CV folder -> its fold models, in fold order)."""
    found: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            numbered = (p for p in source.glob("fold-*/best.pt") if FOLD.fullmatch(p.parent.name))
            if folds := sorted(numbered, key=lambda p: int(p.parent.name.removeprefix("fold-"))):
                found += folds
            elif (source / "best.pt").is_file():
                found.append(source / "best.pt")
            else:
                raise CheckpointError(
                    f"folder '{source}' holds neither fold-*/best.pt (a cross-validation) nor "
                    "best.pt (a run).",
                    "pass checkpoint files, a run folder or a `ctscan train --folds K` folder.",
                )
        else:
            found.append(model_file(source))
    if not found:
        raise CheckpointError("no members given.", "pass one or more checkpoints or folders.")
    return found


def _same_preprocessing(checkpoints: list[Any]) -> None:
    first = checkpoints[0]
    for other in checkpoints[1:]:
        if other.spec != first.spec:
            a, b = first.spec.to_dict(), other.spec.to_dict()
            differs = next(k for k in a if a[k] != b.get(k))
            raise CheckpointError(
                f"'{other.source}' was trained on other preprocessing than '{first.source}' "
                f"({differs}: {b.get(differs)!r} vs {a[differs]!r}).",
                "ensemble models trained on the same processed store (same data settings).",
            )
        if other.channels != first.channels:
            raise CheckpointError(
                f"'{other.source}' ({other.model_name}) takes {other.channels} input channels, "
                f"'{first.source}' ({first.model_name}) {first.channels}.",
                "ensemble models that take the same input (cnn / cnn_gap: 1; resnet18 / "
                "efficientnet_lite0: 3).",
            )


def _output_path(out: Path) -> Path:
    out = Path(out)
    if (problem := checkpoint_file_problem(out, example="ensemble.pt")) is not None:
        raise problem
    if out.exists():
        raise CtscanError(
            f"--out '{out}' exists; an ensemble file is not overwritten.",
            "delete it first or choose another --out.",
        )
    if any((out.parent / name).is_file() for name in RUN_FILES):
        raise CtscanError(
            f"--out '{out}' is in a run folder ('{out.parent}' holds a run's checkpoints and "
            "their drift reference).",
            "write the ensemble into a folder of its own, e.g. outputs/ensembles/NAME/ensemble.pt.",
        )
    taken = sorted(p.name for p in out.parent.glob("*.pt")) if out.parent.is_dir() else []
    if taken or (out.parent / CONFIDENCE_FILE).exists():
        what = f"'{taken[0]}'" if taken else CONFIDENCE_FILE
        raise CtscanError(
            f"--out '{out}': its folder already holds {what}; the drift reference beside an "
            "ensemble must be its own.",
            "give each ensemble a folder of its own, e.g. outputs/ensembles/NAME/ensemble.pt.",
        )
    return ensure_dir(out.parent, what="folder of the --out ensemble") / out.name


def build_ensemble(
    settings: Any, sources: list[Path], *, out: Path, flips: tuple[str, ...] = ()
) -> EnsembleResult:
    """Read, check and combine the members; write the ensemble checkpoint atomically."""
    paths = member_paths(sources)  # a missing member: said before torch is imported
    from ctscan.engine.checkpoint import ENSEMBLE, Checkpoint, build_network
    from ctscan.engine.runtime import resolve_runtime
    from ctscan.models.ensemble import check_flips

    try:
        flips = check_flips(list(flips))
    except ValueError as exc:
        raise CtscanError(f"--tta: {exc}", "use --tta hflip and/or --tta vflip.") from None
    rt = resolve_runtime(settings.train)  # a device that is not there: said before any write
    checkpoints, shas = _read_members(paths)
    _same_preprocessing(checkpoints)
    target = _output_path(out)
    first = checkpoints[0]
    members = [
        {
            "model_name": c.model_name,
            "dropout": float(c.settings.get("model", {}).get("dropout", 0.2)),
            "temperature": float(c.temperature),
            "source": str(Path(p).resolve()),
            "sha256": sha,
            "best_value": c.best_value,
        }
        for p, c, sha in zip(paths, checkpoints, shas, strict=True)
    ]
    ensemble = Checkpoint(
        kind="best",
        model_name=ENSEMBLE,
        spec=first.spec,
        model_state={
            f"members.{k}.net.{key}": value
            for k, c in enumerate(checkpoints)
            for key, value in c.model_state.items()
        },
        settings=first.settings,
        select_metric=first.select_metric,
        data_hash=first.data_hash if len({c.data_hash for c in checkpoints}) == 1 else None,
        members=members,
        flips=flips,
        source=target,
    )
    build_network(ensemble)  # the weights fit the recorded members (a CheckpointError if not)
    reference, warnings = _confidence_reference(settings, ensemble, rt)  # before any write
    written = _write(target, ensemble, reference)  # the checkpoint, then the reference if any
    reference_path = written[1] if len(written) > 1 else None
    return EnsembleResult(target, members, flips, reference_path, warnings)


def _read_members(paths: list[Path]) -> tuple[list[Any], list[str]]:
    """The members' checkpoints and sha256s; an ensemble, a last.pt or a repeat is refused."""
    from ctscan.engine.checkpoint import read_checkpoint

    checkpoints = [read_checkpoint(p) for p in paths]
    for path, ckpt in zip(paths, checkpoints, strict=True):
        if ckpt.is_ensemble:
            raise CheckpointError(
                f"'{path}' is itself an ensemble.", "pass the checkpoints it was built from."
            )
        if ckpt.kind == "last":
            raise CheckpointError(
                f"'{path}' is a run's last.pt (the resume file: the last epoch's weights, not "
                "the ones selected on validation, and never calibrated).",
                f"pass '{Path(path).parent / 'best.pt'}' instead.",
            )
    shas = [file_sha256(p) for p in paths]
    for i, sha in enumerate(shas):
        if sha in shas[:i]:
            raise CheckpointError(
                f"'{paths[i]}' is the same file as '{paths[shas.index(sha)]}' (same sha256).",
                "pass each member once.",
            )
    return checkpoints, shas


def _write(target: Path, ensemble: Any, reference: dict[str, Any] | None) -> list[Path]:
    """Write the ensemble and its drift reference under the folder lock: both or neither."""
    from ctscan.engine.checkpoint import save_checkpoint
    from ctscan.files import atomic_write  # looked up at the call: a test stops it midway

    written: list[Path] = []
    with folder_lock(target.parent, what="ensemble folder"):
        if target.exists():  # written by another `ctscan ensemble` since the check above
            raise CtscanError(
                f"--out '{target}' was written meanwhile by another process.",
                "choose another --out.",
            )
        try:  # both files or neither: a stop or an error in between removes what was written
            written.append(save_checkpoint(target, ensemble))
            if reference is not None:
                body = json.dumps(reference).encode()
                written.append(atomic_write(target.parent / CONFIDENCE_FILE, body))
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
    return written


def _confidence_reference(
    settings: Any, ensemble: Any, rt: Any
) -> tuple[dict[str, Any] | None, list[str]]:
    """Serve's drift reference for the ensemble (not written yet), from the members' store."""
    from ctscan.data.store import open_model_store
    from ctscan.engine.calibration import train_confidence

    try:
        store = open_model_store(settings, ensemble)
    except CtscanError as exc:
        return None, [f"no {CONFIDENCE_FILE} (serve's drift reference) written: {exc}"]
    return train_confidence(ensemble, store, rt), ([store.raw_warning] if store.raw_warning else [])

"""Checkpoints: one dict from the unwrapped model, written atomically, loaded with weights_only."""

from __future__ import annotations

import os
import pickle
import subprocess
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from ctscan.errors import CheckpointError
from ctscan.models import unwrap

__all__ = ["load_checkpoint", "load_model_state", "save_checkpoint", "unwrap"]

FORMAT_VERSION = 1
REQUIRED_KEYS = ("format", "model_name", "model_state", "preprocess", "class_names", "settings")


def git_commit(cwd: Path | None = None) -> str | None:
    """The current git commit of the working directory, or None outside a checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def save_checkpoint(path: Path, payload: dict[str, Any]) -> Path:
    """Write `payload` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": FORMAT_VERSION, **payload}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ctscan checkpoint safely; anything else is refused with a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint '{path}' does not exist.",
            "pass a .pt file written by `ctscan train` (best.pt or last.pt in the run folder).",
        )
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is broken
        raise CheckpointError(
            f"checkpoint '{path}' is not a PyTorch checkpoint file, or it is truncated.",
            "re-copy the file or use another checkpoint (last.pt / best.pt).",
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = str(exc).splitlines()
        reason = next((ln.strip() for ln in lines if "global" in ln.lower()), lines[0])
        raise CheckpointError(
            f"checkpoint '{path}' was refused: it holds objects other than tensors and plain data "
            f"(nothing from it was executed; {reason})",
            "only load checkpoints written by `ctscan train`.",
        ) from None
    except Exception as exc:  # any other failure to parse: a broken or foreign file
        raise CheckpointError(
            f"checkpoint '{path}' is unreadable or truncated ({str(exc).splitlines()[0]}).",
            "re-copy the file or use another checkpoint (last.pt / best.pt).",
        ) from None
    if not isinstance(ckpt, dict) or any(key not in ckpt for key in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
        raise CheckpointError(
            f"'{path}' is not a ctscan checkpoint (missing {', '.join(missing)}).",
            "pass a .pt file written by `ctscan train`.",
        )
    if ckpt["format"] != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint '{path}' has format {ckpt['format']}, this ctscan reads {FORMAT_VERSION}.",
            "use the ctscan version that wrote it.",
        )
    return ckpt


def load_model_state(model: torch.nn.Module, state: dict[str, Any], *, source: Path | str) -> None:
    """Load weights strictly; a checkpoint of another model or shape is a clear error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {len(missing)} (e.g. {missing[0]})" if missing else "",
                f"unexpected {len(unexpected)} (e.g. {unexpected[0]})" if unexpected else "",
                f"shape mismatch {wrong[0]}" if wrong else "",
            )
            if part
        )
        raise CheckpointError(
            f"checkpoint '{source}' does not fit this model: {details}.",
            "use the model name and image size the checkpoint was trained with.",
        )
    model.load_state_dict(state, strict=True)

"""User-facing errors: one class, one place that turns them into a message and an exit code."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


class CtscanError(Exception):
    """A mistake the user can fix: says what is wrong and how to fix it."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} Fix: {self.fix}"


def require_extra(extra: str, needed_by: str, *names: str, fix: str = "") -> None:
    """Each of `names` importable, else one CtscanError: what `needed_by` lacks and the extra."""
    from importlib.util import find_spec

    if missing := [name for name in names if find_spec(name) is None]:
        raise CtscanError(
            f"{needed_by} needs {', '.join(missing)}, not installed.",
            f"pip install 'ctscan[{extra}]'{fix}.",
        )


class SettingsError(CtscanError):
    """A settings file, key or value is wrong. `conflict_keys`: the dotted keys a check across
    keys names (augment.scale_min <= scale_max) when every fault is one; else empty."""

    exit_code = 2
    conflict_keys: frozenset[str] = frozenset()


class DataError(CtscanError):
    """Raw images, the processed store or an input file is missing or broken."""

    exit_code = 3


class CheckpointError(CtscanError):
    """A checkpoint file is missing, broken or does not fit."""

    exit_code = 4


class Interrupted(CtscanError):
    """The user stopped the command: Ctrl-C (exit 130) or SIGTERM (exit 143). Made by
    `jobs.stopped`, which says where the job stopped and how to continue it."""

    def __init__(self, message: str, fix: str | None = None, *, terminated: bool = False) -> None:
        super().__init__(message, fix)
        self.terminated = terminated
        self.exit_code = 143 if terminated else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that `finally` blocks and context managers run."""


def debug_enabled() -> bool:
    """CTSCAN_DEBUG=1 shows tracebacks instead of one-line messages."""
    return os.environ.get("CTSCAN_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


def say_line(line: str) -> None:
    """A progress line on stderr, in one write: a signal cannot split it or glue onto it."""
    sys.stderr.write(f"{line}\n")
    sys.stderr.flush()


def report(error: CtscanError) -> int:
    """Print one line for a user error on stderr and return its exit code."""
    kind = "error"
    if isinstance(error, Interrupted):
        kind = "terminated" if error.terminated else "interrupted"
    sys.stderr.write(f"ctscan: {kind}: {error}\n")
    return error.exit_code


def close_matches(word: str, choices: Iterable[str]) -> str:
    """Return ' Did you mean: a, b?' for close spellings of `word`, or ''."""
    import difflib

    found = difflib.get_close_matches(word, list(choices), n=3, cutoff=0.6)
    return f" Did you mean: {', '.join(found)}?" if found else ""

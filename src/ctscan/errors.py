"""User-facing errors: one class, one place that turns them into a message and an exit code."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class CtscanError(Exception):
    """A mistake the user can fix: says what is wrong and how to fix it."""

    exit_code = 1

    def __init__(self, message: str, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fix = fix

    def __str__(self) -> str:
        return self.message if not self.fix else f"{self.message} Fix: {self.fix}"


class SettingsError(CtscanError):
    """A settings file, key or value is wrong.

    `conflict_keys`: when every fault is a check across keys (augment.scale_min <= scale_max),
    the dotted keys it names; empty when a value is wrong by itself.
    """

    exit_code = 2
    conflict_keys: frozenset[str] = frozenset()


class DataError(CtscanError):
    """Raw images, the processed store or an input file is missing or broken."""

    exit_code = 3


class CheckpointError(CtscanError):
    """A checkpoint file is missing, broken or does not fit."""

    exit_code = 4


_STOPS: list[int] = []  # the stop signals this process received and has not acted on yet


class Interrupted(CtscanError):
    """The user stopped the command: Ctrl-C (exit 130) or SIGTERM (exit 143).

    Making one is acting on the stop: the stops received so far are forgotten (see
    `raise_if_stopped`)."""

    def __init__(self, message: str, fix: str | None = None, *, terminated: bool = False) -> None:
        super().__init__(message, fix)
        _STOPS.clear()
        self.terminated = terminated
        self.exit_code = 143 if terminated else 130


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as an interrupt so that `finally` blocks and context managers run."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: unwind like Ctrl-C does."""
    _STOPS.append(signum)
    raise Terminated()


def raise_interrupt(signum: int, frame: object) -> None:
    """A SIGINT handler: Python's own (KeyboardInterrupt), remembering that it came."""
    _STOPS.append(signum)
    signal.default_int_handler(signum, frame)


def forget_stops() -> None:
    """The stops received so far have been acted on (a graceful shutdown after SIGTERM), or a
    new command starts in this process (the tests)."""
    _STOPS.clear()


def raise_if_stopped() -> None:
    """Act on a stop that was received but swallowed (it landed in a garbage-collector
    callback, where Python prints "Exception ignored" and goes on): raise it again here, at a
    point between two steps of the work, so the command stops as it was asked to."""
    signum = stop_received()
    if signum is not None:
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def stop_received() -> int | None:
    """The first stop signal (SIGINT, SIGTERM) received and not acted on yet, or None.

    A stop can land inside code that swallows it (an import half done, a library's broad
    `except`) and surface as an unrelated error later: the CLI reports that as the stop.
    """
    return _STOPS[0] if _STOPS else None


@contextmanager
def held_signals(*signums: int) -> Iterator[None]:
    """Hold these signals while the block runs; deliver them to the usual handlers on the way out.

    For steps that must not be cut in half (record a finished trial, fork a pool): a Ctrl-C or
    SIGTERM that arrives inside waits for the block to end, then acts as it would have (a
    KeyboardInterrupt or `Terminated` raised from the `with`; nothing if it was ignored). A
    Python-level handler, not a blocked mask: the kernel may hand a process signal to any thread,
    and Python runs the handler in the main thread at its next instruction, wherever that is.
    Outside the main thread (where handlers cannot be set) the block runs unguarded.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in signums:
        handler = signal.getsignal(signum)
        if handler is not None:  # None: set outside Python, cannot be put back
            previous[signum] = signal.signal(signum, lambda s, frame: caught.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            if previous[signum] is not signal.SIG_IGN:
                signal.raise_signal(signum)  # the restored handler runs now


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

"""Durable jobs (train, train --folds, sweep, preprocess): how they stop, continue, keep a record.

Stops: the entry point (`ctscan.__main__.main`, then `cli.main`) installs `on_stop` for Ctrl-C and
SIGTERM; both unwind as KeyboardInterrupt (SIGTERM as `Terminated`) so that `finally` blocks run,
and each stop is remembered until acted on: one swallowed where it landed (a garbage-collector
callback, a half-done import) acts at the next `check_stop()`. `critical()` holds a stop until a
step ends; `stopped()` is the one line a stopped job ends with (`exit_stopped` exits with it for
a command with no line of its own). `MAY_CHANGE`: what a continue may change. `open_run_record`:
the job's MLflow run. The locks are `files.folder_lock` (with `wait=` for a SQLite store) and
`files.database_lock`.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, NoReturn

from ctscan.errors import Interrupted, Terminated, report

if TYPE_CHECKING:  # imported before the stop handlers exist, first of all: kept light
    from ctscan.settings import Settings

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_STOPS: list[int] = []  # the stop signals this process received and has not acted on yet
SAME_STOP_S = 1.0  # a stop this soon after the last is the same stop (a double Ctrl-C)
_LAST_STOP = [float("-inf")]  # when the last stop was received (time.monotonic)


def on_stop(signum: int, frame: object) -> None:
    """The handler of Ctrl-C and SIGTERM: remember the stop, unwind as Ctrl-C does. A second stop
    within SAME_STOP_S of one not acted on yet raises nothing: it would cut the first one's
    unwinding (its cleanup, its stopped line and continue command) in half."""
    now, pending = time.monotonic(), bool(_STOPS)
    _STOPS.append(signum)
    if pending and now - _LAST_STOP[0] < SAME_STOP_S:
        return
    _LAST_STOP[0] = now
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def install_stop_handlers() -> None:
    """`on_stop` for SIGTERM, and for SIGINT unless it is ignored (a background job's); and
    `_quiet_stop` for what Python cannot raise."""
    signal.signal(signal.SIGTERM, on_stop)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, on_stop)
    if sys.unraisablehook is not _quiet_stop:
        _UNRAISABLE[0], sys.unraisablehook = sys.unraisablehook, _quiet_stop


_UNRAISABLE = [sys.__unraisablehook__]  # the hook before `_quiet_stop`, which it passes on to


def _quiet_stop(unraisable: Any) -> None:
    """A stop raised where Python cannot raise it (a `__del__`, a garbage-collector callback)
    is remembered and acts at the next `check_stop()`: Python's "Exception ignored" and its
    traceback would only be noise before the stop's one line. Anything else is passed on."""
    if not (isinstance(unraisable.exc_value, KeyboardInterrupt) and _STOPS):
        _UNRAISABLE[0](unraisable)


def ignore_stops() -> None:
    """The stop is being reported: a second Ctrl-C or SIGTERM while the process exits would
    only print "Exception ignored" noise from the interpreter's shutdown (SIGKILL still works).
    And the exit code is the line's: CPython 3.11-3.13 take a Ctrl-C that left an eval() or
    exec() of a string (typer evaluates the commands' annotations so) for one nobody handled,
    and `python -m ctscan` then ends by SIGINT (-2), not 130; the next such exec forgets it."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    exec("")  # clears CPython's "unhandled KeyboardInterrupt" mark (run_eval_code_obj)


def stop_received() -> int | None:
    """The first stop signal received and not acted on yet (one swallowed where it landed, too:
    the CLI reports the unrelated error it can surface as later as the stop), or None."""
    return _STOPS[0] if _STOPS else None


def forget_stops() -> None:
    """The stops received so far have been acted on (a graceful shutdown after SIGTERM), or a
    new command starts in this process (the tests)."""
    _STOPS.clear()


def check_stop() -> None:
    """Act on a stop that was received but swallowed: raise it again here, between two steps
    of the work, so the job stops as it was asked to."""
    if _STOPS:
        raise Terminated() if _STOPS[0] == signal.SIGTERM else KeyboardInterrupt()


@contextmanager
def critical(*signums: int) -> Iterator[None]:
    """A step a stop must not split: Ctrl-C and SIGTERM (or `signums`) wait for the block, then
    act as they would have (raised from the `with`; nothing if the signal is ignored).

    A Python-level handler, not a blocked mask: the kernel may hand a process signal to any
    thread, and Python runs the handler in the main thread at its next instruction. Outside the
    main thread (where handlers cannot be set) the block runs unguarded."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {}
    for signum in signums or STOP_SIGNALS:
        if signal.getsignal(signum) is not None:  # None: set outside Python, cannot be put back
            previous[signum] = signal.signal(signum, lambda s, frame: caught.append(s))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(caught):
            if previous[signum] is not signal.SIG_IGN:
                signal.raise_signal(signum)  # the restored handler runs now


def stopped(
    job: str, exc: BaseException | None, detail: str, fix: str | None = None
) -> Interrupted:
    """The one line a stopped job ends with: "<job> stopped by Ctrl-C|SIGTERM<detail>.", and the
    fix (the command that continues it). The signal: the one behind `exc` (a `Terminated`, a
    terminated `Interrupted`), else the first received. Acts on the stop: the stops received
    are forgotten."""
    terminated = isinstance(exc, Terminated) or getattr(exc, "terminated", False)
    if exc is None:
        terminated = stop_received() == signal.SIGTERM
    forget_stops()
    how = "SIGTERM" if terminated else "Ctrl-C"
    return Interrupted(f"{job} stopped by {how}{detail}.".lstrip(), fix, terminated=terminated)


def exit_stopped(exc: BaseException | None, why: str, *, again: bool = True) -> NoReturn:
    """Exit with the stop's line for a command that stopped without a line of its own (a job
    prints its own continue command); `again`: the command did not finish, so its continue is
    itself."""
    ignore_stops()
    fix = f"run it again: `{shlex.join(['ctscan', *sys.argv[1:]])}`." if again else None
    sys.exit(report(stopped("", exc, why, fix)))


# Where and how a job runs (threads, device, compile, determinism: the arithmetic's last bits,
# never the recipe) and what it does at its end: a resumed run, a continued cross-validation or
# sweep may change these, never what or how it trains. A job adds its own keys at the call (a
# resumed run's schedule: train.epochs, train.early_stop_patience; a sweep's searched keys).
MAY_CHANGE = (
    "paths.",
    "tracking.",
    "serve.",
    "inference.",
    "data.max_image_pixels",
    "data.max_file_bytes",
    "data.on_bad_file",
    "data.near_duplicate_distance",
    "model.weights_path",
    "train.quiet",
    "train.threads",
    "train.device",
    "train.compile",
    "train.deterministic",
    "train.checkpoint_every",
    "train.evaluate_test",
    "train.calibrate",
)


def changed_settings(before: dict[str, Any], now: Settings) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, value now) for each setting that differs, `section.key` names.
    `before`: the recorded settings (sections of keys); `now`: the settings of this attempt."""
    from ctscan.settings import dotted, flatten

    old = dotted(before)
    return [(k, old[k], v) for k, v in flatten(now).items() if k in old and old[k] != v]


def refused_settings(
    before: dict[str, Any], now: Settings, may_change: tuple[str, ...] = ()
) -> list[tuple[str, Any, Any]]:
    """(key, recorded value, value now) for each change a continue may not make: not in
    MAY_CHANGE, nor one of the job's own `may_change` keys (a resume's train.epochs, a sweep's
    searched keys)."""
    changed = changed_settings(before, now)
    return [c for c in changed if c[0] not in may_change and not c[0].startswith(MAY_CHANGE)]


def refused_changes(
    before: dict[str, Any], now: Settings, may_change: tuple[str, ...] = ()
) -> list[str]:
    """`key old -> new` for each of `refused_settings`."""
    refused = refused_settings(before, now, may_change)
    return [f"{key} {old!r} -> {new!r}" for key, old, new in refused]


def end_status(exc_type: type[BaseException] | None) -> str:
    """The status a run ends with: FINISHED, KILLED for a stop (Ctrl-C, SIGTERM, or the
    `Interrupted` a stopped job turns them into), FAILED for any other error."""
    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, KeyboardInterrupt | Interrupted) else "FAILED"


def open_run_record(
    tracker: Any,
    *,
    run_name: str | None = None,
    recorded_id: str | None = None,
    record: Callable[[str], None] | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    experiment_fix: Callable[[str], str] | None = None,
) -> Any:
    """A job's MLflow run, opened once through `tracker` (engine/tracking.py's, store open).

    The run `recorded_id` names (in last.pt, folds.json, the study) is reopened if it may be
    (`tracker.find_run`); else a new run starts with `tags`, under `parent_run_id`, gets `params`,
    and `record(its id)` keeps it in one critical step with its creation: a stop never leaves a
    run the next attempt cannot find. A stop or failure while opening ends the run (KILLED,
    FAILED). Tracking off: `tracker` is a no-op and `record` is not called.
    """
    if not tracker.enabled:
        return tracker
    stored = tracker.find_run(recorded_id, child=parent_run_id is not None, fix=experiment_fix)
    try:
        with critical():
            tracker.start_run(run_name, stored, recorded_id, tags or {}, parent_run_id)
            if not tracker.reopened:
                tracker.log_params(params or {})
                if record is not None:
                    record(str(tracker.run_id))
    except BaseException as exc:
        tracker.end(type(exc))
        raise
    return tracker


def experiment_fix(experiment: str, new: str) -> str:
    """The fix when a parent run (a cross-validation's, a sweep's) is in another experiment;
    `new`: the job's other way out (its words: "a new study (--name)")."""
    setting = shlex.quote(f"tracking.experiment={json.dumps(experiment)}")
    return f"continue with --set {setting}, or start {new}."

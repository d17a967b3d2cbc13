"""The durable-job core (jobs.py): stops, critical steps, the stopped line, what a continue
may change. Real signals, once here; each command's stop-and-continue runs end to end in its
own test file (test_train, test_cv, test_data_interrupt)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctscan.errors import Interrupted, Terminated
from ctscan.jobs import (
    check_stop,
    critical,
    on_stop,
    refused_changes,
    stop_received,
    stopped,
)
from ctscan.settings import load_settings, public_dict


@pytest.fixture
def ctscan_handlers() -> None:
    """ctscan's own handlers, as `cli.main` installs them (the autouse fixture puts back)."""
    from ctscan.jobs import install_stop_handlers

    install_stop_handlers()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_unwinds_is_remembered_and_a_swallowed_one_acts_at_the_next_step(
    ctscan_handlers: None, sig: int
) -> None:
    raised = Terminated if sig == signal.SIGTERM else KeyboardInterrupt
    with pytest.raises(raised):
        os.kill(os.getpid(), sig)
        time.sleep(1)  # the handler raises at the next instruction
    assert stop_received() == sig
    try:  # swallowed where it landed (a garbage-collector callback, a half-done import)
        os.kill(os.getpid(), sig)
        time.sleep(1)
    except KeyboardInterrupt:
        pass
    Interrupted("made elsewhere")  # constructing an exception changes no state
    assert stop_received() == sig
    with pytest.raises(raised):
        check_stop()  # between two steps of the work
    line = stopped("training", None, " after epoch 2", "continue with `ctscan train ...`.")
    assert stop_received() is None  # acted on: the next check passes
    check_stop()
    how, code = ("SIGTERM", 143) if sig == signal.SIGTERM else ("Ctrl-C", 130)
    assert line.message == f"training stopped by {how} after epoch 2."
    assert line.exit_code == code and line.terminated == (sig == signal.SIGTERM)
    assert str(line).endswith("Fix: continue with `ctscan train ...`.")


def test_a_second_stop_right_after_the_first_does_not_cut_its_unwinding(
    ctscan_handlers: None,
) -> None:
    """SIGTERM, then Ctrl-C 20 ms later while the first still unwinds (a double stop, a
    supervisor's two signals): the first stop's unwinding goes on (exit 143 and its continue
    line, not the bare Ctrl-C line); the second is remembered."""
    with pytest.raises(KeyboardInterrupt) as err:  # Terminated is one: caught either way
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        finally:  # the job's cleanup and stopped line run here
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert type(err.value) is Terminated  # not the second stop's KeyboardInterrupt
    assert stop_received() == signal.SIGTERM
    assert stopped("train", Terminated(), "").exit_code == 143


def test_a_stop_inside_a_critical_step_acts_after_it(ctscan_handlers: None) -> None:
    done = []
    with pytest.raises(Terminated), critical():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        done.append("the whole step")
    assert done == ["the whole step"]
    assert signal.getsignal(signal.SIGTERM) is on_stop  # put back


def test_a_stop_names_the_signal_of_what_it_is_given() -> None:
    assert stopped("x", Terminated(), "").terminated
    assert not stopped("x", KeyboardInterrupt(), "").terminated
    assert stopped("x", Interrupted("fold", terminated=True), "").exit_code == 143
    assert stopped("", KeyboardInterrupt(), "").message == "stopped by Ctrl-C."


def test_a_continue_may_change_where_and_how_it_runs_never_what_it_trains() -> None:
    recorded = public_dict(load_settings([], []))
    where = load_settings(
        [], ["train.quiet=true", "train.calibrate=false", "tracking.experiment='other'"]
    )
    assert refused_changes(recorded, where) == []
    what = load_settings([], ["train.lr=0.5", "train.epochs=99"])
    assert sorted(refused_changes(recorded, what)) == [
        f"train.epochs {recorded['train']['epochs']!r} -> 99",
        f"train.lr {recorded['train']['lr']!r} -> 0.5",
    ]
    assert refused_changes(recorded, what, may_change=("train.epochs",)) == [
        f"train.lr {recorded['train']['lr']!r} -> 0.5"
    ]


# ---- cli.main: the one line and the exit code ------------------------------------------------


def _settings_show_with(patch: str) -> subprocess.CompletedProcess[str]:
    """`ctscan settings show` through `cli.main()` in a fresh interpreter, after `patch`:
    Python source that replaces `settings.load_settings` (the original is `load`) to stop,
    fail or swallow a signal where the command does its work."""
    source = (
        "import atexit, os, signal, sys, ctscan.cli as cli, ctscan.settings as settings\n"
        "load = settings.load_settings\n"
        f"{patch}"
        "sys.argv = ['ctscan', 'settings', 'show']\ncli.main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CTSCAN_DEBUG"}
    return subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env)


def test_ctrl_c_outside_training_is_one_line_exit_130() -> None:
    """A KeyboardInterrupt anywhere in a command: `ctscan: interrupted: ...`, exit 130."""
    proc = _settings_show_with(
        "def boom(*a, **k):\n    raise KeyboardInterrupt\nsettings.load_settings = boom\n"
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == (
        "ctscan: interrupted: stopped by Ctrl-C. Fix: run it again: `ctscan settings show`."
    )


def _swallowing(stop: str, then: str) -> str:
    """A load_settings that sends itself `stop` (if any), drops it as a half-done import or a
    garbage-collector callback would, then runs `then`."""
    return (
        "def swallowing(*a, **k):\n"
        "    try:\n"
        f"        if {stop!r}: os.kill(os.getpid(), getattr(signal, {stop!r}))\n"
        "    except BaseException:\n"
        "        pass\n"
        f"    {then}\n"
        "settings.load_settings = swallowing\n"
    )


@pytest.mark.parametrize(
    ("stop", "code", "line"),
    [
        ("SIGTERM", 143, "ctscan: terminated: stopped by SIGTERM (while starting or stopping"),
        ("SIGINT", 130, "ctscan: interrupted: stopped by Ctrl-C (while starting or stopping"),
        ("", 1, "AttributeError: module 'numpy' has no attribute 'matrix'"),  # a bug: traceback
    ],
)
def test_a_stop_swallowed_mid_import_is_reported_as_the_stop(stop: str, code: int, line: str):
    """A stop that lands where it is swallowed (an import half done) surfaces later as another
    error: that error is the stop's doing, reported as the stop, not as a traceback."""
    proc = _settings_show_with(
        _swallowing(stop, "raise AttributeError(\"module 'numpy' has no attribute 'matrix'\")")
    )
    assert proc.returncode == code, proc.stderr
    assert line in proc.stderr
    if stop:
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_a_stop_swallowed_by_work_that_then_finishes_still_exits_as_stopped() -> None:
    """The stop landed where Python prints "Exception ignored" and goes on (a garbage
    collector callback): the command's work ends, and the exit still says it was stopped."""
    proc = _settings_show_with(_swallowing("SIGTERM", "return load(*a, **k)"))
    assert proc.returncode == 143, proc.stderr
    assert proc.stderr.strip().startswith("ctscan: terminated: stopped by SIGTERM (it landed")
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("stop", "code", "kind"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")]
)
def test_a_stop_in_a_garbage_collector_callback_prints_no_traceback(
    stop: str, code: int, kind: str
) -> None:
    """A real stop landing in a `__del__` (where Python cannot raise it: it prints "Exception
    ignored" and a traceback, then goes on): remembered and acted on, with the one line only.
    Found by bench/stop_chaos.py (a sweep's Ctrl-C in a WeakKeyDictionary callback)."""
    proc = _settings_show_with(
        "import time\n"
        "class Dropped:\n"
        "    def __del__(self):\n"
        f"        os.kill(os.getpid(), signal.{stop})\n"
        "        time.sleep(0.5)  # the handler raises here, inside __del__\n"
        "def dropping(*a, **k):\n"
        "    Dropped()\n"
        "    return load(*a, **k)\n"
        "settings.load_settings = dropping\n"
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stderr.startswith(f"ctscan: {kind}: stopped by "), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(
    ("module", "entry", "stop"),
    [
        ("ctscan.settings", "ctscan.cli", "SIGINT"),
        ("typer", "ctscan.__main__", "SIGINT"),
        ("typer", "ctscan.__main__", "SIGTERM"),
    ],
)
def test_a_ctrl_c_while_the_cli_starts_is_the_one_line(module: str, entry: str, stop: str) -> None:
    """A Ctrl-C as the command starts (as `module` is imported): the one line and 130, not a
    KeyboardInterrupt traceback. `cli.main` installs the handlers before it imports anything
    slow (jobs.py imports the settings only where it compares them), and the `ctscan` script's
    and `python -m ctscan`'s entry, `ctscan.__main__.main`, before it imports the CLI (typer:
    the first ~0.3 s). Found by bench/stop_chaos.py (a preprocess stopped 0.8 s after its
    start; a Ctrl-C 0.1 s after `ctscan` starts)."""
    source = (
        "import importlib, importlib.abc, os, signal, sys\n"
        "class StopAt(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        f"        if name == {module!r}:\n"
        f"            os.kill(os.getpid(), signal.{stop})\n"
        "sys.meta_path.insert(0, StopAt())\n"
        f"entry = importlib.import_module({entry!r})\n"
        "sys.argv = ['ctscan', 'settings', 'show']\nentry.main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CTSCAN_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True, env=env)
    term = stop == "SIGTERM"
    line = "terminated: stopped by SIGTERM" if term else "interrupted: stopped by Ctrl-C"
    assert proc.returncode == (143 if term else 130), proc.stderr
    assert proc.stderr.startswith(f"ctscan: {line}"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_ctrl_c_out_of_an_eval_still_exits_130_under_python_m(tmp_path: Path) -> None:
    """A Ctrl-C that raises inside code run by eval() of a string (as typer evaluates the
    commands' annotations while it builds them, in the first ~0.3 s): CPython 3.11-3.13 mark it
    as an unhandled KeyboardInterrupt, and `python -m ctscan` then killed itself by SIGINT
    after the one line (exit -2, not 130). Found by bench/stop_chaos.py (a preprocess stopped
    0.24 s after its start, 1 in 4-12 tries); only `python -m` (not a script) exits that way."""
    (tmp_path / "stop_in_eval.py").write_text(
        "import os, signal, sys, time\n"
        "import ctscan.settings as settings\n"
        "from ctscan.__main__ import main\n"
        "load = settings.load_settings\n"
        "def stopped_in_eval(*a, **k):\n"
        "    eval('os.kill(os.getpid(), signal.SIGINT) or time.sleep(1)')  # raises in the eval\n"
        "    return load(*a, **k)\n"
        "settings.load_settings = stopped_in_eval\n"
        "sys.argv = ['ctscan', 'settings', 'show']\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CTSCAN_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "stop_in_eval"], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 130, proc.stderr  # -2: killed by SIGINT after the line
    assert proc.stderr.strip() == (
        "ctscan: interrupted: stopped by Ctrl-C. Fix: run it again: `ctscan settings show`."
    )


def test_a_second_stop_while_exiting_is_ignored() -> None:
    """After the one line for a stop, another SIGTERM while the interpreter shuts down does
    not add "Exception ignored" noise or change the exit code."""
    proc = _settings_show_with(
        "atexit.register(lambda: os.kill(os.getpid(), signal.SIGTERM))\n"
        "def stopped(*a, **k):\n    raise KeyboardInterrupt\n"
        "settings.load_settings = stopped\n"
    )
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == (
        "ctscan: interrupted: stopped by Ctrl-C. Fix: run it again: `ctscan settings show`."
    )


@pytest.mark.parametrize("handler", ["default", "ignored", "outside the main thread"])
def test_a_critical_step_delivers_a_stop_after_it_as_the_usual_handler_would(handler: str) -> None:
    import threading

    ran: list[str] = []

    def held_block() -> None:
        with critical(signal.SIGINT):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the holding handler has run by now
            ran.append("to the end")

    if handler == "outside the main thread":  # cannot hold there: the block runs as it is
        thread = threading.Thread(target=held_block)
        with pytest.raises(KeyboardInterrupt):  # the main thread takes the Ctrl-C
            thread.start()
            thread.join()
            time.sleep(0.05)
        thread.join()
    elif handler == "ignored":
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            held_block()  # an ignored Ctrl-C stays ignored
        finally:
            signal.signal(signal.SIGINT, previous)
    else:
        with pytest.raises(KeyboardInterrupt):
            held_block()
    assert ran == ["to the end"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

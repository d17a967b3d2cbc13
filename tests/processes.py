"""`ctscan` as a user runs it: a fresh process with a clean environment, or one stopped at a
known point of its training.

    ctscan_stopped(["train", "--out", str(out), ...], signal.SIGTERM, at=2)

runs `ctscan train ...` as a process that sends itself a real SIGTERM in its second validation
(an epoch's end, counted across folds and trials): the real signal through the real handlers,
once epoch 1's last.pt is written and epoch 2 is trained, without a test polling for a file and
racing the run to its end. In the test's own process, the `ctrl_c_in_validation` fixture
(conftest_store.py) raises KeyboardInterrupt at the same point.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def clean_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without CTSCAN_ / MLFLOW_ variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CTSCAN_", "MLFLOW_"))}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def ctscan(
    *args: str, cwd: Path | None = None, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m ctscan ARGS` in a fresh process, environment `clean_env(env)`."""
    return subprocess.run(
        [sys.executable, "-m", "ctscan", *args],
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd=cwd,
    )


def ctscan_in_process(*args: str, cwd: Path | None = None) -> Any:
    """`ctscan ARGS` run by Typer in this process (the environment `clean_env()` would give, in
    `cwd`); its click Result, which must exit 0. For a command whose output, not its process,
    is checked: it spares an interpreter that would import torch again."""
    import pytest
    from typer.testing import CliRunner

    from ctscan.cli import app

    unset = {k: None for k in os.environ if k.startswith(("CTSCAN_", "MLFLOW_"))}
    with pytest.MonkeyPatch.context() as patch:
        if cwd is not None:
            patch.chdir(cwd)
        result = CliRunner(env=unset).invoke(app, list(args))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    assert "Traceback" not in result.stderr
    return result


def stopping_at(validate: Callable[..., Any], at: int, stop: Callable[[], None]) -> Callable:
    """`validate` that calls `stop()` first in its `at`-th call."""
    calls: list[int] = []

    def validate_then_stop(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == at:
            stop()
        return validate(*args, **kwargs)

    return validate_then_stop


def ctscan_stopped(
    args: list[str], sig: signal.Signals, at: int, *, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`ctscan ARGS` in a fresh process (environment `clean_env()`) that sends itself `sig` in
    its `at`-th validation."""
    command = [sys.executable, __file__, sig.name, str(at), *args]
    return subprocess.run(command, capture_output=True, text=True, env=clean_env(), cwd=cwd)


def _main() -> None:
    """`python processes.py SIGNAL AT ARGS...`: what `ctscan_stopped` runs."""
    del sys.path[0]  # this folder: nothing here may shadow what ctscan imports
    import ctscan.engine.train as train
    from ctscan.cli import main

    sig, at = getattr(signal, sys.argv[1]), int(sys.argv[2])
    train.validate = stopping_at(train.validate, at, lambda: os.kill(os.getpid(), sig))
    sys.argv = ["ctscan", *sys.argv[3:]]
    main()


if __name__ == "__main__":
    _main()

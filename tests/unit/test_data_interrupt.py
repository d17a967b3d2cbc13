"""Ctrl-C during `ctscan preprocess`: one line, exit 130, no worker tracebacks, no temp folder;
the same command then writes the whole store."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FOLDERS, save_gray, smooth_image

N_IMAGES = 800  # well above POOL_MIN_IMAGES, and enough that the pool runs for seconds (CI: 320
# finished under load before the Ctrl-C arrived)
SIDE = 640  # big enough that the pool is still busy a moment after it starts


needs_proc_children = pytest.mark.skipif(
    sys.platform != "linux"
    or not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(),
    reason="needs Linux /proc to see the pool workers start",
)


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _big_raw_tree(root: Path) -> Path:
    """N_IMAGES files, written as copies of a few pictures (encoding each one is slow)."""
    sources = []
    for seed in range(4):
        save_gray(smooth_image(seed, SIDE, SIDE), root.parent / "src" / f"{seed}.png")
        sources.append((root.parent / "src" / f"{seed}.png").read_bytes())
    per_folder = N_IMAGES // sum(len(f) for f in FOLDERS.values())
    for split, folders in FOLDERS.items():
        for i, folder in enumerate(folders.values()):
            (root / split / folder).mkdir(parents=True)
            for k in range(per_folder):
                (root / split / folder / f"{k}.png").write_bytes(sources[i])
    return root


@contextlib.contextmanager
def _busy_preprocess(args: list[str]) -> Iterator[tuple[Any, list[int]]]:
    """`ctscan preprocess ARGS` in its own process group (as a terminal's foreground job), and
    its pool workers, once they are busy decoding; the group is killed if left running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ctscan", "preprocess", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("CTSCAN_")},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not _children(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        workers = _children(proc.pid)
        assert workers, "the pool never started: " + proc.communicate()[1]
        time.sleep(0.3)  # the workers are busy decoding
        assert proc.poll() is None, "preprocess finished before the stop: make the tree bigger"
        yield proc, workers
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
@needs_proc_children
def test_ctrl_c_during_the_pool_is_one_line_exit_130_and_leaves_nothing(tmp_path: Path) -> None:
    raw = _big_raw_tree(tmp_path / "raw" / "chest-ctscan-images")
    work = tmp_path / "work"
    work.mkdir()
    out = work / "processed"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTSCAN_")}
    with _busy_preprocess([str(raw), "--out", str(out), "--quiet"]) as (proc, _):
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C reaches the whole group
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "ForkPoolWorker" not in err, err
    command = shlex.join(["ctscan", "preprocess", str(raw), "--out", str(out), "--quiet"])
    assert err.strip() == (  # main() (cli.py): the continue of a preprocess is itself
        f"ctscan: interrupted: stopped by Ctrl-C. Fix: run it again: `{command}`."
    ), err
    assert proc.returncode == 130
    assert list(work.iterdir()) == []  # no store, no `.processed.tmp-*` left behind
    again = subprocess.run(  # the continue of a preprocess: the same command, from the start
        [sys.executable, "-m", "ctscan", "preprocess", str(raw), "--out", str(out), "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert again.returncode == 0, again.stderr
    from ctscan.data.store import load_store

    store = load_store(out)
    assert sum(store.counts.values()) + len(store.meta["dropped"]) == len(list(raw.rglob("*.png")))


@pytest.mark.skipif(sys.platform != "linux", reason="fork start method")
@pytest.mark.parametrize("taken_by", ["main thread", "another thread"])
def test_a_ctrl_c_while_the_pool_forks_is_raised_not_lost(taken_by: str) -> None:
    """The parent ignored SIGINT while it forked the workers, so a Ctrl-C in that moment was
    dropped and preprocess ran to the end (CI: 'store written' instead of exit 130). Then it
    blocked SIGINT in the main thread only: the kernel gave the signal to another thread, Python
    raised KeyboardInterrupt inside the pool's start and the workers leaked (CI, twice)."""
    import multiprocessing as mp
    import threading

    from ctscan.data.preprocess import _start_pool

    fork = mp.get_context("fork")
    made: list = []
    idle = threading.Event()
    other = threading.Thread(target=idle.wait, daemon=True)  # as MLflow's or torch's threads
    other.start()

    class CtrlCWhileForking:
        def Pool(self, **kwargs: object) -> object:  # multiprocessing's name
            pool = fork.Pool(**kwargs)
            made.append(pool)
            if taken_by == "main thread":
                os.kill(os.getpid(), signal.SIGINT)  # the terminal's Ctrl-C, mid-start
            else:
                signal.pthread_kill(other.ident, signal.SIGINT)
            time.sleep(0.2)  # Python code keeps running inside the start
            return pool

    try:
        with pytest.raises(KeyboardInterrupt):
            _start_pool(CtrlCWhileForking(), 2)
    finally:
        idle.set()
    (pool,) = made
    assert not any(worker.is_alive() for worker in pool._pool)  # terminated, not leaked
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_a_sigterm_that_reaches_a_worker_before_its_initializer_ends_it() -> None:
    """terminate() after a stop mid-start may reach a worker just forked: it ran ctscan's
    handler there (inherited), or CPython dropped it as it forked, and the parent waited for that
    worker for ever (1 stop in 27). Workers now start with SIGTERM blocked until they ignore
    Ctrl-C and take SIGTERM's default action."""
    import multiprocessing as mp

    from ctscan.data.preprocess import _start_pool
    from ctscan.jobs import install_stop_handlers

    fork = mp.get_context("fork")

    def terminated_first(initializer):  # terminate() comes before the worker's initializer
        def init(*args: object) -> None:
            os.kill(os.getpid(), signal.SIGTERM)
            initializer(*args)
            time.sleep(30)  # not reached: the SIGTERM held since the fork ends it here

        return init

    forked: list = []  # every worker, in order (the pool replaces the ones that end)

    class Forking(type(fork)):
        def Process(self, *args: object, **kwargs: object) -> object:
            forked.append(super().Process(*args, **kwargs))
            return forked[-1]

        def Pool(self, **kwargs: object) -> object:  # multiprocessing's name
            init = terminated_first(kwargs["initializer"])
            return super().Pool(**{**kwargs, "initializer": init})

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    install_stop_handlers()  # the workers inherit ctscan's handlers, as under the CLI
    try:
        pool = _start_pool(Forking(), 2)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    first = forked[:2]
    for worker in first:
        worker.join(timeout=20)
    pool.terminate()
    pool.join()
    assert [w.exitcode for w in first] == [-signal.SIGTERM] * 2  # not 1: no Terminated raised


@pytest.mark.slow
@needs_proc_children
def test_the_pool_workers_end_quietly_when_preprocess_is_killed(tmp_path: Path) -> None:
    """SIGKILL of preprocess alone: its workers end with it, without BrokenPipeError tracebacks
    (they inherit its stderr: the pipe reaches EOF only once every worker has exited)."""
    raw = _big_raw_tree(tmp_path / "raw" / "chest-ctscan-images")
    with _busy_preprocess([str(raw), "--out", str(tmp_path / "p")]) as (proc, workers):
        os.kill(proc.pid, signal.SIGKILL)  # the parent only, not its process group
        _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err
    deadline = time.monotonic() + 10  # a killed worker closes its files a moment before it ends
    while [pid for pid in workers if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)]


def _alive(pid: int) -> bool:
    """Running, not ended (a zombie waits for the process that adopted it to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")

"""files.folder_lock: one holder at a time, and no `.lock` file left behind."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from ctscan.errors import CtscanError
from ctscan.files import folder_lock


def test_the_lock_refuses_a_second_holder_and_leaves_no_file(tmp_path: Path) -> None:
    held = f"in use by another ctscan process \\(pid {os.getpid()}\\)"
    with folder_lock(tmp_path, what="run folder"):
        assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()}"
        with pytest.raises(CtscanError, match=held), folder_lock(tmp_path, what="run folder"):
            pass
    assert list(tmp_path.iterdir()) == []
    with folder_lock(tmp_path, what="run folder"):  # free again
        pass


def test_the_lock_is_released_and_removed_when_the_body_raises(tmp_path: Path) -> None:
    with pytest.raises(KeyError), folder_lock(tmp_path, what="run folder"):
        raise KeyError("boom")
    assert not (tmp_path / ".lock").exists()


def test_a_lock_file_left_by_a_killed_process_does_not_block(tmp_path: Path) -> None:
    (tmp_path / ".lock").write_text("pid 1")  # what SIGKILL leaves: a file nobody holds
    with folder_lock(tmp_path, what="run folder"):
        assert (tmp_path / ".lock").read_text() == f"pid {os.getpid()}"
    assert not (tmp_path / ".lock").exists()


def _contend(folder: str, rounds: int, overlaps: multiprocessing.Value) -> None:
    inside = Path(folder) / "inside"
    for _ in range(rounds):
        try:
            with folder_lock(Path(folder), what="run folder"):
                try:
                    fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:  # another process holds the lock too
                    with overlaps.get_lock():
                        overlaps.value += 1
                    continue
                os.close(fd)
                os.unlink(inside)
        except CtscanError:
            pass


def test_removing_the_file_never_lets_two_processes_hold_the_lock(tmp_path: Path) -> None:
    # A process that opened `.lock` just before its holder removed it must not lock the removed
    # file while a third process locks the new one.
    overlaps = multiprocessing.get_context("fork").Value("i", 0)
    procs = [
        multiprocessing.get_context("fork").Process(
            target=_contend, args=(str(tmp_path), 400, overlaps)
        )
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    assert overlaps.value == 0
    assert not (tmp_path / ".lock").exists()

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


def test_release_never_removes_a_lock_file_that_is_not_its_own(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    with folder_lock(run, what="run folder"):
        run.rename(tmp_path / "run-old")  # a user moves the folder away and starts again
        run.mkdir()
        with folder_lock(run, what="run folder"):
            pass
        second = run / ".lock"
        second.write_text("pid 999999")  # as if another process held the new folder now
    assert second.read_text() == "pid 999999"  # the first holder did not delete it
    # its own file moved with the folder: left there, unlocked, and no obstacle
    with folder_lock(tmp_path / "run-old", what="run folder"):
        pass


def test_a_lock_path_that_is_a_symlink_directory_or_foreign_file_is_one_line(
    tmp_path: Path,
) -> None:
    precious = tmp_path / "precious.txt"
    precious.write_text("DATA")
    cases = {}
    for name, make in {
        "symlink": lambda lock: lock.symlink_to(precious),
        "dangling": lambda lock: lock.symlink_to(tmp_path / "nothere.txt"),
        "directory": lambda lock: lock.mkdir(),
        "fifo": lambda lock: os.mkfifo(lock),
        "foreign": lambda lock: lock.write_text("their lockfile"),
    }.items():
        folder = tmp_path / name
        folder.mkdir()
        make(folder / ".lock")
        with pytest.raises(CtscanError) as err, folder_lock(folder, what="run folder"):
            pass
        cases[name] = str(err.value)
        assert str(folder / ".lock") in str(err.value) and "choose another run folder" in str(
            err.value
        )
    assert precious.read_text() == "DATA" and not (tmp_path / "nothere.txt").exists()
    assert (tmp_path / "foreign" / ".lock").read_text() == "their lockfile"
    assert "a symlink" in cases["symlink"] and "not a regular file" in cases["fifo"]
    assert "not a ctscan lock file" in cases["foreign"]


def test_a_write_the_file_system_refuses_is_one_line_and_keeps_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ctscan.errors import CtscanError
    from ctscan.files import atomic_write

    target = tmp_path / "reference_confidence.json"
    target.write_bytes(b"old")

    def refused(src: object, dst: object) -> None:  # as a folder made read-only would
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("ctscan.files.os.replace", refused)
    with pytest.raises(CtscanError) as err:
        atomic_write(target, lambda fh: fh.write(b"new"))
    assert err.value.message == f"cannot write '{target}': Permission denied."
    assert "write permission" in str(err.value.fix)
    assert target.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [target]
    monkeypatch.undo()
    with pytest.raises(CtscanError, match="No such file or directory"):
        atomic_write(tmp_path / "gone" / "x.json", lambda fh: fh.write(b"x"))


def test_a_lock_with_wait_takes_turns_and_says_who_held_it_too_long(tmp_path: Path) -> None:
    import threading

    released, holding, letting_go = threading.Event(), threading.Event(), threading.Event()

    def hold(seconds: float) -> None:
        with folder_lock(tmp_path, what="store"):
            holding.set()
            released.wait(seconds)
            letting_go.set()  # the last thing done under the lock

    holder = threading.Thread(target=hold, args=(0.4,))
    holder.start()
    assert holding.wait(30)  # the thread holds it now (a sleep lost that race on a busy machine)
    with folder_lock(tmp_path, what="store", wait=30):  # waits for the holder to finish
        assert letting_go.is_set()  # (is_alive() raced the thread's exit after the release)
    holder.join()
    holding.clear()
    held = threading.Thread(target=hold, args=(30,))
    held.start()
    assert holding.wait(30)
    try:
        too_long = r"has held the lock '.*\.lock' for over 0 s"
        with (
            pytest.raises(CtscanError, match=too_long),
            folder_lock(tmp_path, what="store", wait=0.2),
        ):
            pass
    finally:
        released.set()
        held.join()

"""Files and folders the user names: checked (`ensure_dir`), written atomically (`atomic_write`),
locked (`folder_lock`; `database_lock` for PostgreSQL), each OS error one `CtscanError` line."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from ctscan.errors import CheckpointError, CtscanError

TEMP_SUFFIX = ".tmp"
RUN_FIX = "pass best.pt or last.pt from a run folder written by `ctscan train`."

log = logging.getLogger(__name__)


def folder_problem(path: Path | str, *, create: bool = True) -> str | None:
    """Why `path` cannot be a folder to write in ("is a file, ...", "lies under ..."), or None.
    With `create`, the folder (and its parents) is created and a probe file written in it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return "is a file, not a folder"
    blocker = next((p for p in path.parents if p.exists() or p.is_symlink()), None)
    if blocker is not None and not blocker.is_dir():
        return f"lies under '{blocker}', which is a file, not a folder"
    if not create:
        return None
    probe = None
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".ctscan-write-test-", dir=path)
        os.close(fd)
    except OSError as exc:
        return f"cannot be written: {exc.strerror or exc} ('{exc.filename or path}')"
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)
    return None


def ensure_dir(
    path: Path | str, *, what: str, error: type[CtscanError] = CtscanError, fix: str | None = None
) -> Path:
    """Create folder `path` (and its parents) or raise one error naming it, why it cannot be
    used (a file, under a file, not writable) and the fix; `what` says what it is for."""
    if (problem := folder_problem(path)) is not None:
        fix = fix or f"choose another {what} (an existing or new folder you can write to)."
        raise error(f"{what} '{path}' {problem}.", fix)
    return Path(path)


def checkpoint_file_problem(target: Path, *, example: str) -> CtscanError | None:
    """Why `--out TARGET` cannot name a checkpoint file to write (a folder, not .pt), or None."""
    if target.is_dir():
        return CtscanError(
            f"--out '{target}' is a folder; it names the checkpoint file to write.",
            f"pass a file such as '{target / example}'.",
        )
    if target.suffix != ".pt":
        return CtscanError(
            f"--out '{target}' does not end in .pt.",
            f"name the file '{target.with_suffix('.pt').name}'.",
        )
    return None


def model_file(path: Path | str, what: str = "checkpoint", fix: str = RUN_FIX) -> Path:
    """`path` if it is a file, else a CheckpointError: a folder (naming its best.pt) or missing.
    Torch-free: the CLI checks a checkpoint argument with it before torch is imported (2.7 s)."""
    path = Path(path)
    if path.is_dir():
        hint = " (it holds best.pt)" if (path / "best.pt").is_file() else ""
        raise CheckpointError(
            f"'{path}' is a folder, not a {what} file{hint}.",
            f"pass the file, e.g. '{path / 'best.pt'}'.",
        )
    if not path.is_file():
        raise CheckpointError(f"{what} '{path}' does not exist.", fix)
    return path


def file_sha256(path: Path | str) -> str:
    """The sha256 of a file's bytes (a checkpoint's or an exported model's identity)."""
    with Path(path).open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any] | bytes) -> Path:
    """Write `path` (the bytes `write`, or through `write(fh)`) into a temp file beside it
    (`built_aside`), fsync, rename over it. A file-system failure (a read-only folder, a full
    disk) is one CtscanError line."""
    path = Path(path)
    try:
        with built_aside(path) as tmp, open(tmp, "wb") as fh:
            if isinstance(write, bytes):
                fh.write(write)
            else:
                write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        raise CtscanError(
            f"cannot write '{path}': {exc.strerror or exc}.",
            "check that folder (free space, write permission) and run again, or choose "
            "another output folder.",
        ) from exc
    return path


@contextlib.contextmanager
def built_aside(path: Path) -> Iterator[Path]:
    """A temp file beside `path` (empty) for the block to build `path` at, renamed over it when
    the block ends without an error and removed otherwise: `path` is the old file or the whole
    new one, never half of it (after SIGKILL `remove_stale_temps` cleans the temp file)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def remove_stale_temps(folder: Path, names: tuple[str, ...]) -> None:
    """Delete temp files `atomic_write` left for `names` in `folder` (call under `folder_lock`)."""
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*{TEMP_SUFFIX}"):
            with contextlib.suppress(OSError):
                tmp.unlink()


@contextlib.contextmanager
def folder_lock(
    folder: Path,
    *,
    what: str,
    error: type[CtscanError] = CtscanError,
    wait: float = 0.0,
    name: str = ".lock",
) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (the file `name` inside it): at once (run, cv, sweep
    folders), or within `wait` seconds (the MLflow SQLite store's migrations), or fail with one
    line. An advisory `flock` goes away with its process, even after SIGKILL. The file is removed
    on release; whoever takes the lock checks that the path still names the file it locked. No
    lock without fcntl (Windows) or where the file system cannot lock."""
    lock_path = Path(folder) / name
    fh = _take_lock(lock_path, folder, what, error, wait)
    if fh is None:
        yield
        return
    with fh:  # closing it releases the lock, after the file is removed
        text = fh.read().strip()
        if text and not _LOCK_TEXT.fullmatch(text):  # not left by a ctscan process: not ours
            raise error(
                f"'{lock_path}' is not a ctscan lock file (it holds other text).",
                f"move it away, or choose another {what}.",
            )
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()}")
        fh.flush()
        try:
            yield
        finally:
            if _names_open_file(lock_path, fh):  # not if renamed or replaced meanwhile
                with contextlib.suppress(OSError):
                    lock_path.unlink()  # still held: a later opener finds no file, or a new one


def _take_lock(
    lock_path: Path, folder: Path, what: str, error: type[CtscanError], wait: float
) -> IO | None:
    """`lock_path` opened and flock-ed (None where no lock can be taken), or one error line."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux/macOS
        return None
    deadline = time.monotonic() + wait
    while True:
        fh = _open_lock(lock_path, what, error)
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = fh.read().strip() or "another process"
            fh.close()
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            if wait:
                raise error(
                    f"another ctscan process ({holder}) has held the lock '{lock_path}' for "
                    f"over {wait:.0f} s.",
                    "wait for it or stop it (`fuser` or `lsof` on the lock file names it).",
                ) from None
            raise error(
                f"{what} '{folder}' is in use by another ctscan process ({holder}).",
                f"wait for it to finish, or choose another {what}.",
            ) from None
        except OSError as exc:  # ENOLCK: this file system cannot lock
            fh.close()
            log.warning("cannot lock %s (%s): no lock", lock_path, exc.strerror or exc)
            return None
        if _names_open_file(lock_path, fh):
            return fh
        fh.close()  # its holder removed it as we locked it: lock the file the path names now


_LOCK_TEXT = re.compile(r"pid \d+")


def hide_password(text: str) -> str:
    """`postgresql://user:secret@host` -> `postgresql://user:***@host` (messages, commands)."""
    return re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)


@contextlib.contextmanager
def database_lock(
    url: str, name: str, *, what: str, error: type[CtscanError], fix: str
) -> Iterator[None]:
    """`folder_lock` for a PostgreSQL database: an advisory lock keyed by `name`, waited for, on
    a connection of its own; it ends with that connection, also after SIGKILL. A driver that
    cannot be imported is one `error` line naming `what`, with `fix`."""
    import zlib

    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    except ImportError as exc:
        raise error(f"{what} needs a driver that cannot be imported ({exc}).", fix) from None
    try:
        with engine.connect() as connection:
            key = zlib.crc32(name.encode())
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            yield  # released when the connection closes
    finally:
        engine.dispose()


def _open_lock(lock_path: Path, what: str, error: type[CtscanError]) -> IO:
    """`lock_path` opened for reading and writing (created if absent): a regular file only,
    never through a symlink (a link there could make the lock overwrite another file)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    fix = f"move '{lock_path}' away if no ctscan process is using it, or choose another {what}."
    try:
        fd = os.open(lock_path, flags, 0o644)
    except OSError as exc:
        why = "a symlink" if lock_path.is_symlink() else exc.strerror
        raise error(f"cannot take the lock '{lock_path}': {why}.", fix) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise error(f"cannot take the lock '{lock_path}': it is not a regular file.", fix)
    return os.fdopen(fd, "r+")


def _names_open_file(path: Path, fh: IO) -> bool:
    """Whether `path` still names the file open as `fh` (same device and inode)."""
    try:
        return os.path.samestat(path.lstat(), os.fstat(fh.fileno()))
    except OSError:
        return False

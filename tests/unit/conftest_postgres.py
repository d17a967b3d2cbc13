"""A throwaway PostgreSQL 15 server for the tests that share one study between processes.

`throwaway_postgres()` (also used by bench/sweep_scaling.py) starts a cluster (initdb in a temp
folder, a free port on 127.0.0.1, trust auth, fsync off); the session fixture `postgres_url(name)`
creates a database on it and returns its SQLAlchemy URL. PostgreSQL
refuses to run as root: as root (CI, containers) the cluster belongs to the `postgres` user, or
`nobody`, and its processes drop to that user. Skips where the binaries or psycopg are missing.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

PG_BIN = Path(os.environ.get("CTSCAN_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _unprivileged() -> dict[str, Any]:
    """subprocess arguments that run a command as a non-root user when we are root."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    raise PostgresMissing("running as root with no 'postgres' or 'nobody' user to run it as")


class PostgresMissing(Exception):
    """No PostgreSQL server can be started here (the reason says why)."""


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[Callable[[str], str]]:
    """A PostgreSQL server for the block; yields `create(name)`: a new database's URL."""
    if not (PG_BIN / "initdb").is_file() or not (PG_BIN / "postgres").is_file():
        raise PostgresMissing(f"no PostgreSQL binaries in {PG_BIN} (set CTSCAN_TEST_PG_BIN)")
    try:
        import psycopg
    except ImportError:
        raise PostgresMissing("psycopg (the sweep extra) is not installed") from None
    as_user = _unprivileged()
    root = Path(tempfile.mkdtemp(prefix="ctscan-pg-"))  # not under pytest's 0700 root-only tree
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
    data = root / "data"
    initdb = [str(PG_BIN / "initdb"), "-D", str(data), "-U", "ctscan", "--auth=trust"]
    subprocess.run([*initdb, "--no-sync"], check=True, capture_output=True, **as_user)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            *(str(PG_BIN / "postgres"), "-D", str(data), "-p", str(port)),
            *("-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={root}"),
            *("-c", "fsync=off", "-c", "max_connections=200"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        **as_user,
    )
    dsn = f"host=127.0.0.1 port={port} user=ctscan dbname=postgres"
    try:
        for _ in range(300):
            try:
                admin = psycopg.connect(dsn, autocommit=True)
                break
            except psycopg.OperationalError:
                if server.poll() is not None:
                    code = server.returncode
                    raise RuntimeError(f"PostgreSQL exited at start (code {code})") from None
                time.sleep(0.1)
        else:
            raise RuntimeError("PostgreSQL did not answer within 30 s")

        def create(name: str) -> str:
            admin.execute(f'CREATE DATABASE "{name}"')
            return f"postgresql+psycopg://ctscan@127.0.0.1:{port}/{name}"

        with admin:
            yield create
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown: ends the sessions left open
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[Callable[[str], str]]:
    """`postgres_url(name)`: a new, empty database `name` on a throwaway server; its URL."""
    try:
        with throwaway_postgres() as create:
            yield create
    except PostgresMissing as missing:
        pytest.skip(str(missing))

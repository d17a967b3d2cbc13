"""Where MLflow runs go: the tracking URI, its store made ready (folders, a server that answers,
a SQLite or PostgreSQL store created or migrated under ctscan's lock), one-line errors for a store
that cannot be used. Imported by tracking.py; mlflow only inside functions."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ctscan import files
from ctscan.errors import CtscanError
from ctscan.settings import TrackingSettings

TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
SERVER_PROBE_TIMEOUT_S = 5.0
NOISY_LOGGERS = ("mlflow", "mlflow.pytorch", "alembic")
STORE_LOCK_TIMEOUT_S = 600.0


class TrackingError(CtscanError):
    """The tracking store or server cannot be used."""


DISABLE_FIX = "or set tracking.enabled=false to train without tracking."


def resolve_uri(tracking: TrackingSettings, runs_dir: Path) -> tuple[str, str]:
    """The tracking URI (tracking.uri, else MLFLOW_TRACKING_URI, else a SQLite file in runs_dir)
    and where it came from, checked for a known scheme."""
    if tracking.uri and tracking.uri.strip():
        uri, source = tracking.uri.strip(), "tracking.uri"
    elif os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        uri, source = os.environ["MLFLOW_TRACKING_URI"].strip(), "MLFLOW_TRACKING_URI"
    else:
        uri, source = f"sqlite:///{(Path(runs_dir) / 'mlflow.db').resolve()}", "default"
    if (scheme := scheme_of(uri)) and scheme not in TRACKING_SCHEMES:
        raise TrackingError(
            f"tracking URI '{uri}' (from {source}) has the unknown scheme '{scheme}:'; "
            f"known schemes: {', '.join(TRACKING_SCHEMES)}.",
            "correct the URI (e.g. http://host:5000 or sqlite:///path/mlflow.db), unset it to use "
            f"the default SQLite store in paths.runs_dir, {DISABLE_FIX}",
        )
    return uri, source


def scheme_of(uri: str) -> str:
    """The URI scheme without a driver suffix ('postgresql+psycopg2' -> 'postgresql')."""
    if "://" not in uri and not uri.startswith(("file:", "databricks")):
        return ""  # a plain path: MLflow's file store
    return urlsplit(uri).scheme.lower().split("+", 1)[0]


def sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for an in-memory database)."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    path = rest[1:] if rest.startswith("/") else rest  # sqlite:///rel.db or sqlite:////abs.db
    path = path.split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _local_folder(uri: str, runs_dir: Path) -> Path | None:
    """The folder of a local store (a SQLite file's, else runs_dir; a file store), else None."""
    scheme = scheme_of(uri)
    if scheme == "sqlite":
        db = sqlite_path(uri)
        return db.parent if db is not None else Path(runs_dir)
    return Path(urlsplit(uri).path if scheme == "file" else uri) if scheme in ("", "file") else None


def artifact_location(uri: str, runs_dir: Path) -> str | None:
    """Where a new experiment keeps artifacts: next to a SQLite store, else the server decides."""
    if scheme_of(uri) != "sqlite":
        return None
    return (_local_folder(uri, runs_dir) / "mlartifacts").resolve().as_uri()


def _prepare_local_store(uri: str, runs_dir: Path) -> None:
    """The folder of a local store, made and checked writable (one clear error if not)."""
    folder = _local_folder(uri, runs_dir)
    if folder is None:
        return
    fix = f"choose a writable paths.runs_dir or tracking.uri, {DISABLE_FIX}"
    files.ensure_dir(folder, what="tracking store folder", error=TrackingError, fix=fix)


def _probe_server(uri: str, source: str) -> None:
    """Fail fast, with a clear message, when an http(s) tracking server does not answer."""
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https"):
        return
    host = parts.hostname or "localhost"
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise TrackingError(
            f"tracking URI '{uri}' (from {source}) has an invalid port.",
            "write it as http://host:5000.",
        ) from None
    try:
        socket.create_connection((host, port), timeout=SERVER_PROBE_TIMEOUT_S).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise TrackingError(
            f"cannot reach the MLflow tracking server at '{uri}' (from {source}): {reason}.",
            "start it (mlflow server --host 0.0.0.0 --port 5000 ...), correct tracking.uri / "
            f"MLFLOW_TRACKING_URI, unset them to use the local SQLite store, {DISABLE_FIX}",
        ) from None


def _broken_store(db: Path, why: str, hint: str = "") -> TrackingError:
    """The error for a SQLite store file MLflow cannot use, with the way out."""
    path = shlex.quote(str(db))
    return TrackingError(
        f"the MLflow store '{db}' {why}.",
        f"{hint}move it aside (mv {path} {shlex.quote(str(db) + '.broken')}) and rerun to start a "
        f"new store, point tracking.uri at another store, {DISABLE_FIX}",
    )


def _check_sqlite_file(db: Path) -> None:
    """Refuse a file that is not SQLite, or that an interrupted migration left half done."""
    if not db.is_file() or db.stat().st_size == 0:
        return  # a new store
    try:
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows = conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' "
                "AND name LIKE '\\_alembic\\_tmp\\_%' ESCAPE '\\' ORDER BY name"
            ).fetchall()
    except sqlite3.DatabaseError as exc:
        raise _broken_store(db, f"is not an SQLite database it can read ({exc})") from None
    if rows:
        tables = ", ".join(name for (name,) in rows)
        raise _broken_store(
            db, f"was left half-migrated by an interrupted MLflow migration (table {tables})"
        )


def _open_sqlite_store(uri: str, runs_dir: Path) -> None:
    """Create or migrate a SQLite store under the lock; a broken store is a TrackingError. A new
    store's Default experiment keeps its artifacts in `mlartifacts/` beside it, not ./mlruns."""
    db = sqlite_path(uri)
    if db is None:
        return  # in-memory: one process only
    db = db.resolve()
    lock = files.folder_lock(
        db.parent,
        what="MLflow store",
        error=TrackingError,
        wait=STORE_LOCK_TIMEOUT_S,
        name=f"{db.name}.lock",
    )
    with lock, quiet():
        files.remove_stale_temps(db.parent, (db.name,))  # a store creation killed with SIGKILL
        _check_sqlite_file(db)
        if db.is_file() and db.stat().st_size:
            _migrate_sqlite_store(uri, db, runs_dir)
            return
        # A new store is built beside its place and renamed into it: a stop (or a kill) during
        # MLflow's migrations, which take seconds, leaves no half-made store to refuse later.
        with files.built_aside(db) as tmp:
            query = "".join(uri.partition("?")[1:])  # "?..." or ""
            _migrate_sqlite_store(f"sqlite:///{tmp}{query}", db, runs_dir, artifacts_for=uri)


def _migrate_sqlite_store(
    uri: str, db: Path, runs_dir: Path, *, artifacts_for: str | None = None
) -> None:
    """Let MLflow create or migrate the store at `uri` (called under the lock); its failures
    become one TrackingError naming `db`. `artifacts_for`: the URI whose artifact folder the
    Default experiment gets (the store's final place when it is built aside)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    try:
        store = SqlAlchemyStore(uri, artifact_location(artifacts_for or uri, runs_dir))
        missing = _missing_tables(store.engine)
        store.engine.dispose()  # no connection left on a file about to be renamed
    except Exception as exc:  # migrations fail in many ways (alembic, SQLAlchemy, MLflow)
        reason = first_line(exc)
        if "database is locked" in reason:
            raise TrackingError(
                f"the MLflow store '{db}' is locked by another process: {reason}",
                "rerun when that process is done writing, " + DISABLE_FIX,
            ) from exc
        if artifacts_for is not None:  # a new store: nothing to move aside
            raise TrackingError(
                f"cannot create the MLflow store '{db}': {reason}",
                f"check that folder (free space, permissions), point tracking.uri at another "
                f"store, {DISABLE_FIX}",
            ) from exc
        hint = ""
        if "Can't locate revision" in reason:
            hint = "if a newer MLflow wrote it: upgrade mlflow (pip install -U 'mlflow<4'); or "
        if "out-of-date database schema" in reason:
            hint = f"if an older MLflow wrote it: back it up, run `mlflow db upgrade {uri}`; or "
        raise _broken_store(db, f"cannot be opened: {reason}", hint) from exc
    if missing:
        raise _broken_store(
            db, f"cannot be opened: its schema version lacks tables ({', '.join(missing)})"
        )


def _missing_tables(engine: Any) -> list[str]:
    """MLflow's tables that the database lacks (its alembic version can claim otherwise)."""
    import sqlalchemy
    from mlflow.store.db.base_sql_model import Base

    return sorted(set(Base.metadata.tables) - set(sqlalchemy.inspect(engine).get_table_names()))


def _open_postgres_store(uri: str, source: str) -> None:
    """Create or migrate a PostgreSQL store one process at a time: MLflow's Alembic migrations
    collide when two processes start on a fresh database together (the sweep's lock, reused)."""
    import mlflow
    import sqlalchemy.exc

    where = f"'{files.hide_password(uri)}' (from {source})"
    fix = f"pip install psycopg, write postgresql+psycopg://..., {DISABLE_FIX}"
    lock = files.database_lock(
        uri, "ctscan.mlflow-store", what=f"the MLflow store {where}", error=TrackingError, fix=fix
    )
    try:
        with lock, quiet():
            mlflow.MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except (sqlalchemy.exc.SQLAlchemyError, mlflow.exceptions.MlflowException) as exc:
        raise TrackingError(
            f"cannot open the MLflow store {where}: {first_line(exc)}",
            f"check that the database is up and tracking.uri is right, {DISABLE_FIX}",
        ) from None


def open_store(tracking: TrackingSettings, runs_dir: Path) -> tuple[str, str]:
    """The tracking URI and its source, its store ready: local folders made, a server that
    answers, a SQLite or PostgreSQL store created or migrated under ctscan's lock."""
    uri, source = resolve_uri(tracking, runs_dir)
    _prepare_local_store(uri, runs_dir)
    _probe_server(uri, source)
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise TrackingError(
            f"mlflow cannot be imported ({exc}).", f"pip install 'mlflow>=3,<4', {DISABLE_FIX}"
        ) from None
    if scheme_of(uri) == "sqlite":
        _open_sqlite_store(uri, runs_dir)
    elif scheme_of(uri) == "postgresql":
        _open_postgres_store(uri, source)
    return uri, source


@contextlib.contextmanager
def using_uri(uri: str) -> Iterator[None]:
    """Point MLflow's process-wide tracking URI at `uri`, then back (env variable included)."""
    import mlflow

    previous_env_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous_env_uri)  # None also clears the env variable


@contextlib.contextmanager
def quiet(level: int = logging.WARNING) -> Iterator[None]:
    """Hold MLflow's and alembic's chatter below `level`: INFO (database migrations,
    registrations) by default; CRITICAL where a failure becomes ctscan's own one line."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), level))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def first_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"

"""Experiment tracking with MLflow: runs, params, metrics, artifacts and the model registry.

This is the only module of ctscan that imports mlflow, and it does so only inside the code that
runs when tracking is enabled: with `tracking.enabled = false` mlflow is never imported.

Tracking URI precedence (highest first): `tracking.uri` (settings file, `--set tracking.uri=...`
or `CTSCAN_TRACKING__URI`), the `MLFLOW_TRACKING_URI` environment variable, the default
`sqlite:///<runs_dir>/mlflow.db` with artifacts in `<runs_dir>/mlartifacts`.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ctscan.errors import CtscanError
from ctscan.models import unwrap
from ctscan.settings import TrackingSettings

if TYPE_CHECKING:
    import numpy as np
    import torch
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT_NAME = "model"
TAG_SELECT_METRIC = "ctscan.select_metric"
TAG_SELECT_VALUE = "ctscan.select_value"
TAG_HIGHER_IS_BETTER = "ctscan.higher_is_better"
TAG_RUN_ID = "ctscan.run_id"
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "postgresql", "mysql", "mssql", "databricks")
SERVER_PROBE_TIMEOUT_S = 5.0
MAX_PARAM_CHARS = 6000
NOISY_LOGGERS = ("mlflow", "mlflow.pytorch", "alembic")


class TrackingError(CtscanError):
    """The tracking store or server cannot be used."""


_DISABLE_FIX = "or set tracking.enabled=false to train without tracking."


class Tracker:
    """Tracking switched off: every method is a safe no-op."""

    enabled: bool = False
    run_id: str | None = None
    uri: str | None = None

    def log_params(self, params: dict[str, Any]) -> None:
        """Record run parameters (values are stored as strings)."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record metric values at a step (the epoch for the training loop)."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file or a folder into the run's artifacts."""

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """Store a dict as a JSON or YAML artifact (by the file's suffix)."""

    def log_model(
        self,
        model: torch.nn.Module,
        *,
        input_example: np.ndarray,
        select_metric: str,
        select_value: float,
        higher_is_better: bool = True,
    ) -> dict | None:
        """Log and register the model; returns None when tracking or model logging is off."""
        return None

    def close(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED."""
        _check_status(status)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        status = "FINISHED"
        if exc_type is not None:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        if exc_type is None:
            self.close(status)
            return
        try:
            self.close(status)
        except TrackingError as close_error:  # do not hide the error that ended the run
            log.warning("could not close the tracking run: %s", close_error)


def _check_status(status: str) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")


def resolve_tracking_uri(tracking: TrackingSettings, runs_dir: Path) -> str:
    """The tracking URI: tracking.uri, else MLFLOW_TRACKING_URI, else a SQLite file in runs_dir."""
    return _resolve_uri(tracking, runs_dir)[0]


def _resolve_uri(tracking: TrackingSettings, runs_dir: Path) -> tuple[str, str]:
    """The tracking URI and where it came from, checked for a known scheme."""
    if tracking.uri and tracking.uri.strip():
        uri, source = tracking.uri.strip(), "tracking.uri"
    elif os.environ.get("MLFLOW_TRACKING_URI", "").strip():
        uri, source = os.environ["MLFLOW_TRACKING_URI"].strip(), "MLFLOW_TRACKING_URI"
    else:
        uri, source = f"sqlite:///{(Path(runs_dir) / 'mlflow.db').resolve()}", "default"
    scheme = _scheme(uri)
    if scheme and scheme not in TRACKING_SCHEMES:
        raise TrackingError(
            f"tracking URI '{uri}' (from {source}) has the unknown scheme '{scheme}:'; "
            f"known schemes: {', '.join(TRACKING_SCHEMES)}.",
            "correct the URI (e.g. http://host:5000 or sqlite:///path/mlflow.db), unset it to use "
            f"the default SQLite store in paths.runs_dir, {_DISABLE_FIX}",
        )
    return uri, source


def _scheme(uri: str) -> str:
    """The URI scheme without a driver suffix ('postgresql+psycopg2' -> 'postgresql')."""
    if "://" not in uri and not uri.startswith(("file:", "databricks")):
        return ""  # a plain path: MLflow's file store
    return urlsplit(uri).scheme.lower().split("+", 1)[0]


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for an in-memory database)."""
    rest = uri.split("://", 1)[1] if "://" in uri else ""
    path = rest[1:] if rest.startswith("/") else rest  # sqlite:///rel.db or sqlite:////abs.db
    path = path.split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _artifact_location(uri: str, runs_dir: Path) -> str | None:
    """Where a new experiment keeps artifacts: next to a SQLite store, else the server decides."""
    if _scheme(uri) != "sqlite":
        return None
    db = _sqlite_path(uri)
    root = db.parent if db is not None else Path(runs_dir)
    return (root / "mlartifacts").resolve().as_uri()


def _prepare_local_store(uri: str, source: str, runs_dir: Path) -> None:
    """Create the folders of a local store; a clear error if they cannot be written."""
    scheme = _scheme(uri)
    folders: list[Path] = []
    if scheme == "sqlite":
        db = _sqlite_path(uri)
        folders.append(db.parent if db is not None else Path(runs_dir))
    elif scheme in ("", "file"):
        folders.append(Path(urlsplit(uri).path) if scheme == "file" else Path(uri))
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            raise TrackingError(
                f"cannot create the tracking store folder '{folder}' for '{uri}' (from {source}): "
                f"{reason}.",
                f"choose a writable paths.runs_dir or tracking.uri, {_DISABLE_FIX}",
            ) from None
        if not os.access(folder, os.W_OK):
            raise TrackingError(
                f"the tracking store folder '{folder}' is not writable.",
                f"choose a writable paths.runs_dir or tracking.uri, {_DISABLE_FIX}",
            )


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
        with socket.create_connection((host, port), timeout=SERVER_PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise TrackingError(
            f"cannot reach the MLflow tracking server at '{uri}' (from {source}): {reason}.",
            "start it (mlflow server --host 0.0.0.0 --port 5000 ...), correct tracking.uri / "
            f"MLFLOW_TRACKING_URI, unset them to use the local SQLite store, {_DISABLE_FIX}",
        ) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hold MLflow's and alembic's INFO chatter (database migrations, registrations)."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


def model_requirements() -> list[str]:
    """Pinned pip requirements for a logged model (explicit, so MLflow infers nothing)."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "torchvision", "numpy"):
        try:
            reqs.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return reqs


def _float_or_none(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return None if value is None or math.isnan(value) else value


def promote_if_better(
    client: MlflowClient,
    name: str,
    version: int | str,
    value: float,
    higher_is_better: bool = True,
    *,
    metric: str | None = None,
) -> bool:
    """Point the 'champion' alias at `version` if its value beats the champion's (or none exists).

    The champion's value is read from its `ctscan.select_value` tag. A champion without that tag,
    or selected by another metric than `metric`, is not comparable: the alias stays (a warning
    says how to move it by hand). A tie or a NaN value does not promote.
    """
    from mlflow.exceptions import MlflowException

    if math.isnan(value):
        return False
    try:
        champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException as exc:
        if exc.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            raise
        champion = None
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
        return True
    if str(champion.version) == str(version):
        return False
    champion_value = _float_or_none(champion.tags.get(TAG_SELECT_VALUE))
    champion_metric = champion.tags.get(TAG_SELECT_METRIC)
    if champion_value is None or (metric and champion_metric and champion_metric != metric):
        why = (
            f"has no {TAG_SELECT_VALUE} tag"
            if champion_value is None
            else f"was selected by {champion_metric}, not {metric}"
        )
        log.warning(
            "model %s version %s is the champion but %s: not comparable, the alias stays. "
            "Move it by hand: MlflowClient().set_registered_model_alias(%r, %r, '%s').",
            name,
            champion.version,
            why,
            name,
            CHAMPION_ALIAS,
            version,
        )
        return False
    better = value > champion_value if higher_is_better else value < champion_value
    if better:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
    return better


class MlflowTracker(Tracker):
    """One MLflow run in one experiment; the registered model gets the logged models."""

    enabled = True

    def __init__(
        self,
        tracking: TrackingSettings,
        *,
        runs_dir: Path,
        run_name: str | None = None,
    ) -> None:
        uri, source = _resolve_uri(tracking, runs_dir)
        _prepare_local_store(uri, source, runs_dir)
        _probe_server(uri, source)
        try:
            import mlflow
        except ImportError as exc:
            raise TrackingError(
                f"mlflow cannot be imported ({exc}).",
                f"pip install 'mlflow>=3,<4', {_DISABLE_FIX}",
            ) from None

        self.settings = tracking
        self.uri = uri
        self._source = source
        self._closed = False
        # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI: restored on close so a later
        # tracker in this process resolves its URI afresh.
        self._previous_env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            with self._errors("open the experiment"), _quiet():  # quiet: SQLite migrations
                self.client = mlflow.MlflowClient(tracking_uri=uri)
                experiment_id = self._experiment_id(tracking.experiment, runs_dir)
                run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
        except BaseException:
            self._restore_uri()
            raise
        self.experiment_id = experiment_id
        self.run_id = run.info.run_id

    @contextlib.contextmanager
    def _errors(self, action: str) -> Iterator[None]:
        """Turn MLflow and file-system failures into one TrackingError line."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except (MlflowException, OSError) as exc:
            raise TrackingError(
                f"MLflow could not {action} at '{self.uri}' (from {self._source}): "
                f"{_first_line(exc)}",
                "check the tracking store/server (`ctscan settings show` shows tracking.*), "
                + _DISABLE_FIX,
            ) from exc

    def _experiment_id(self, name: str, runs_dir: Path) -> str:
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = _artifact_location(self.uri, runs_dir)
            return self.client.create_experiment(name, artifact_location=location)
        if experiment.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment '{name}' (id {experiment.experiment_id}) is deleted.",
                f"restore it (mlflow experiments restore --experiment-id "
                f"{experiment.experiment_id}) or set tracking.experiment to another name.",
            )
        return experiment.experiment_id

    def _restore_uri(self) -> None:
        import mlflow

        mlflow.set_tracking_uri(self._previous_env_uri)  # None also clears the env variable

    @contextlib.contextmanager
    def _active_run(self) -> Iterator[None]:
        """Make this run the active MLflow run (resumed, then ended again, after close)."""
        import mlflow

        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            yield
            return
        previous_env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        try:
            status = self.client.get_run(self.run_id).info.status
            with _quiet():
                mlflow.start_run(run_id=self.run_id)
            try:
                yield
            finally:
                with _quiet(), contextlib.redirect_stdout(io.StringIO()):  # links: shown once
                    mlflow.end_run(status=status)
        finally:
            mlflow.set_tracking_uri(previous_env_uri)

    def log_params(self, params: dict[str, Any]) -> None:
        """Record run parameters (values are stored as strings)."""
        from mlflow.entities import Param

        batch = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in params.items()]
        with self._errors("log parameters"):
            self.client.log_batch(self.run_id, params=batch)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record metric values at a step (the epoch for the training loop)."""
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        batch = [Metric(key, float(value), now_ms, int(step)) for key, value in metrics.items()]
        with self._errors("log metrics"):
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""
        from mlflow.entities import RunTag

        batch = [RunTag(key, str(value)) for key, value in tags.items()]
        with self._errors("set tags"):
            self.client.log_batch(self.run_id, tags=batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file or a folder into the run's artifacts."""
        path = Path(path)
        if not path.exists():
            raise TrackingError(f"artifact '{path}' does not exist.", "log a file that exists.")
        with self._errors(f"log the artifact '{path}'"):
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict, artifact_file: str) -> None:
        """Store a dict as a JSON or YAML artifact (by the file's suffix)."""
        with self._errors(f"log '{artifact_file}'"):
            self.client.log_dict(self.run_id, data, artifact_file)

    def log_model(
        self,
        model: torch.nn.Module,
        *,
        input_example: np.ndarray,
        select_metric: str,
        select_value: float,
        higher_is_better: bool = True,
    ) -> dict | None:
        """Log the model (torch.export 'pt2' format), register a version, maybe move 'champion'.

        May be called after close: the ended run is resumed for the model and ended again with
        its status. The model is copied to the CPU in eval mode; compile/DDP wrappers are
        removed. An `input_example` with a batch of 1 is repeated to 2 rows so the exported
        graph keeps a dynamic batch dimension. A model that torch.export cannot trace is pickled
        instead (loading it then needs ctscan installed). Returns the registered name and
        version, whether it was promoted, and the champion's version and value after the
        decision; None when `tracking.log_model` is false.
        """
        if not self.settings.log_model:
            return None
        import mlflow
        import mlflow.pytorch
        import numpy as np
        from mlflow.exceptions import MlflowException

        example = np.asarray(input_example)
        if example.ndim > 0 and example.shape[0] == 1:
            example = np.concatenate([example, example])
        net = copy.deepcopy(unwrap(model)).to("cpu").eval()
        requirements = model_requirements()
        with self._errors("log the model"), self._active_run(), _quiet():
            try:
                info = mlflow.pytorch.log_model(
                    net,
                    name=MODEL_ARTIFACT_NAME,
                    input_example=example,
                    pip_requirements=requirements,
                    serialization_format="pt2",
                )
            except (MlflowException, OSError):
                raise
            except Exception as exc:  # torch.export could not trace the model
                log.warning("torch.export failed (%s); logging a pickled model", _first_line(exc))
                logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # same warning again
                info = mlflow.pytorch.log_model(
                    net,
                    name=MODEL_ARTIFACT_NAME,
                    input_example=example,
                    pip_requirements=requirements,
                    serialization_format="pickle",
                )
            return self._register(info, select_metric, float(select_value), higher_is_better)

    def _register(
        self, info: Any, select_metric: str, select_value: float, higher_is_better: bool
    ) -> dict:
        """Add a registry version for a logged model and decide on the champion alias."""
        from mlflow.exceptions import MlflowException

        name = self.settings.registered_model
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        tags = {
            TAG_SELECT_METRIC: select_metric,
            TAG_SELECT_VALUE: repr(select_value),
            TAG_HIGHER_IS_BETTER: str(higher_is_better).lower(),
            TAG_RUN_ID: self.run_id,
        }
        version = self.client.create_model_version(
            name, source=info.model_uri, run_id=self.run_id, tags=tags, model_id=info.model_id
        )
        promoted = promote_if_better(
            self.client, name, version.version, select_value, higher_is_better, metric=select_metric
        )
        champion = self.client.get_model_version_by_alias(name, CHAMPION_ALIAS)
        return {
            "name": name,
            "version": int(version.version),
            "promoted": promoted,
            "champion_version": int(champion.version),
            "champion_value": _float_or_none(champion.tags.get(TAG_SELECT_VALUE)),
            "model_uri": f"models:/{name}/{version.version}",
        }

    def close(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED (a second call does nothing)."""
        import mlflow

        _check_status(status)
        if self._closed:
            return
        self._closed = True
        try:
            with (
                self._errors("end the run"),
                _quiet(),
                contextlib.redirect_stdout(sys.stderr),  # MLflow prints run links on stdout
            ):
                active = mlflow.active_run()
                if active is not None and active.info.run_id == self.run_id:
                    mlflow.end_run(status=status)
                else:
                    self.client.set_terminated(self.run_id, status=status)
        finally:
            self._restore_uri()


def open_tracker(
    tracking: TrackingSettings, *, runs_dir: Path, run_name: str | None = None
) -> Tracker:
    """A started MLflow run when tracking is enabled, else a no-op Tracker."""
    if not tracking.enabled:
        return Tracker()
    return MlflowTracker(tracking, runs_dir=Path(runs_dir), run_name=run_name)

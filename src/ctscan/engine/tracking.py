"""Experiment tracking with MLflow: runs, params, metrics, artifacts and the model registry.

With tracking_store.py (where runs go) the only modules that import mlflow, and only when tracking
is enabled. Runs are written through `MlflowClient`, never made MLflow's process-wide active run;
a job opens its run once and records it in `jobs.open_run_record`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ctscan.engine import tracking_store
from ctscan.engine.tracking_store import DISABLE_FIX, TrackingError, first_line, quiet, using_uri
from ctscan.jobs import critical, end_status, open_run_record
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
TAG_RESUMED_FROM = "ctscan.resumed_from_run_id"
TAG_PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under its parent
TAG_CLASS_NAMES = "ctscan.class_names"
TAG_MODEL_NAME = "ctscan.model_name"
TAG_CTSCAN_VERSION = "ctscan.ctscan_version"
SPEC_ARTIFACT = "ctscan_spec.json"
SPEC_KEYS = ("class_names", "preprocess", "model_name", "ctscan_version", "checkpoint_sha256")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
MAX_PARAM_CHARS = 6000


class Tracker:
    """Tracking switched off: every method is a safe no-op (what each does: MlflowTracker)."""

    enabled: bool = False
    run_id: str | None = None
    reopened: bool = False  # an earlier run continued (it holds its params already)

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...
    def set_tags(self, tags: dict[str, str]) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_dict(self, data: dict, artifact_file: str) -> None: ...
    def log_model(self, model: torch.nn.Module, **options: Any) -> dict | None: ...

    def close(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED."""
        if status not in RUN_STATUSES:
            raise ValueError(f"run status {status!r} is not one of {', '.join(RUN_STATUSES)}")

    def end(self, exc_type: type[BaseException] | None = None) -> None:
        """Close with the status `exc_type` means; after an error, failing to close is a warning."""
        try:
            self.close(end_status(exc_type))
        except TrackingError as close_error:
            if exc_type is None:
                raise
            log.warning("could not close the tracking run: %s", close_error)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        self.end(exc_type)


@contextlib.contextmanager
def _unless_error(*codes: str) -> Iterator[None]:
    """Swallow an MlflowException with one of these error codes (a thing missing or there)."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as exc:
        if exc.error_code not in codes:
            raise


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
        value = float(text or "nan")  # a missing tag: NaN, None below
    except ValueError:
        return None
    return None if math.isnan(value) else value


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
    A champion without a `ctscan.select_value` tag, or selected by another `metric`, is not
    comparable: the alias stays (a warning says how to move it). A tie or NaN does not promote."""
    if math.isnan(value):
        return False
    champion = None
    with _unless_error("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):  # no champion yet
        champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
    if champion is not None:
        if str(champion.version) == str(version):
            return False
        champion_value = _float_or_none(champion.tags.get(TAG_SELECT_VALUE))
        champion_metric = champion.tags.get(TAG_SELECT_METRIC)
        if champion_value is None or (metric and champion_metric and champion_metric != metric):
            why = f"was selected by {champion_metric}, not {metric}"
            why = f"has no {TAG_SELECT_VALUE} tag" if champion_value is None else why
            log.warning(
                "model %s version %s is the champion but %s: not comparable, the alias stays. "
                "Move it by hand: MlflowClient().set_registered_model_alias(%r, %r, '%s').",
                *(name, champion.version, why, name, CHAMPION_ALIAS, version),
            )
            return False
        if not (value > champion_value if higher_is_better else value < champion_value):
            return False
    client.set_registered_model_alias(name, CHAMPION_ALIAS, str(version))
    return True


class MlflowTracker(Tracker):
    """One MLflow run of a store, written through `MlflowClient`; the registered model gets the
    logged models. Made with the store open and no run: `jobs.open_run_record` starts one."""

    enabled = True

    def __init__(self, tracking: TrackingSettings, *, runs_dir: Path) -> None:
        self.settings, self.runs_dir = tracking, Path(runs_dir)
        self.uri, self._source = tracking_store.open_store(tracking, self.runs_dir)
        self._closed = False
        import mlflow

        with self._errors("open the store"), quiet():
            self.client = mlflow.MlflowClient(tracking_uri=self.uri)

    def find_run(
        self, run_id: str | None, *, child: bool, fix: Callable[[str], str] | None
    ) -> Any | None:
        """The run `run_id` of this store to reopen, or None (a new run starts: a warning says
        why, and the new run is tagged TAG_RESUMED_FROM). Not reopened: a run this store lacks
        or has deleted, a `child`'s run in another experiment than tracking.experiment. A
        parent's run there (`fix` given) is refused, `fix(its experiment)` the fix."""
        if not run_id:
            return None
        experiment, run = self.settings.experiment, None
        with self._errors("open the experiment"), quiet():
            with _unless_error("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                run = self.client.get_run(run_id)
            why = "is not in this tracking store" if run is None else ""
            if run is not None and run.info.lifecycle_stage == "deleted":
                why = "is deleted"
            elif run is not None and (child or fix is not None):
                name = self.client.get_experiment(run.info.experiment_id).name
                if name != experiment and fix is not None:
                    raise TrackingError(
                        f"MLflow run {run_id} ({run.info.run_name}) is in experiment '{name}', "
                        f"but tracking.experiment is now '{experiment}': the runs started under "
                        "it would land in another experiment than it.",
                        fix(name),
                    )
                if name != experiment:
                    why = f"is in experiment '{name}', not tracking.experiment '{experiment}'"
            if not why:
                return run
            self._experiment_id(experiment)  # a deleted experiment: refused before the warning
        log.warning(
            "MLflow run %s %s (%s): starting a new run tagged %s=%s",
            *(run_id, why, self.uri, TAG_RESUMED_FROM, run_id),
        )
        return None

    def start_run(
        self,
        run_name: str | None,
        stored: Any | None,
        resumed_from: str | None,
        tags: dict[str, str],
        parent_run_id: str | None,
    ) -> None:
        """Reopen `stored` (status RUNNING again), else create a run in tracking.experiment with
        `tags` from its creation (a child nested under `parent_run_id`, however early it stops)."""
        from mlflow.tracking.context.registry import resolve_tags

        if parent_run_id:
            tags = {**tags, TAG_PARENT_RUN_ID: parent_run_id}
        with self._errors("start the run"), quiet():
            self.reopened = stored is not None
            if stored is not None:
                self.run_id, self.experiment_id = stored.info.run_id, stored.info.experiment_id
                self.client.update_run(self.run_id, status="RUNNING")
                self.set_tags(tags)
                return
            if resumed_from:
                tags = {**tags, TAG_RESUMED_FROM: resumed_from}
            self.experiment_id = self._experiment_id(self.settings.experiment)
            run = self.client.create_run(
                self.experiment_id, run_name=run_name, tags=resolve_tags(tags)
            )
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
                f"{first_line(exc)}",
                "check the tracking store/server (`ctscan settings show` shows tracking.*), "
                + DISABLE_FIX,
            ) from exc

    def _experiment_id(self, name: str) -> str:
        """The experiment `name` (created if missing; refused if deleted)."""
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            location = tracking_store.artifact_location(self.uri, self.runs_dir)
            with _unless_error("RESOURCE_ALREADY_EXISTS"):  # another process created it just now
                return self.client.create_experiment(name, artifact_location=location)
            experiment = self.client.get_experiment_by_name(name)
        if experiment.lifecycle_stage == "deleted":
            store = shlex.quote(f"MLFLOW_TRACKING_URI={self.uri}")
            raise TrackingError(
                f"MLflow experiment '{name}' (id {experiment.experiment_id}) is deleted.",
                f"restore it ({store} mlflow experiments restore --experiment-id "
                f"{experiment.experiment_id}) or set tracking.experiment to another name.",
            )
        return experiment.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        """Record run parameters (values are stored as strings)."""
        from mlflow.entities import Param

        self._log_batch(params=[Param(k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record metric values at a step (the epoch for the training loop)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._log_batch(metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def set_tags(self, tags: dict[str, str]) -> None:
        """Set run tags."""
        from mlflow.entities import RunTag

        self._log_batch(tags=[RunTag(key, str(value)) for key, value in tags.items()])

    def _log_batch(self, **batch: list) -> None:
        with self._errors(f"log {', '.join(batch)}"), quiet(logging.CRITICAL):  # one line
            self.client.log_batch(self.run_id, **batch)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Copy a file or a folder into the run's artifacts."""
        with self._errors(f"log the artifact '{path}'"):
            if Path(path).is_dir():
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
        metadata: dict[str, Any],
        select_metric: str,
        select_value: float,
        higher_is_better: bool = True,
    ) -> dict | None:
        """Log the model (torch.export 'pt2' format), register a version, maybe move 'champion'.

        `model` maps the uint8 gray batch `(B, 1, S, S)` (`input_example`'s shape) to logits;
        `metadata` (SPEC_KEYS at least) goes into the MLmodel file, `ctscan_spec.json` beside it
        and, in part, the version's tags. May be called after close. A batch of 1 is repeated to
        2 rows so the exported graph keeps a dynamic batch dimension; a model torch.export cannot
        trace is pickled (loading it needs ctscan). Returns the registered name and version,
        whether it was promoted and the champion after it; None when tracking.log_model is false.
        """
        if not self.settings.log_model:
            return None
        _import_mlflow_pytorch()
        import mlflow.pytorch
        import numpy as np
        import torch
        from mlflow.exceptions import MlflowException
        from mlflow.models import infer_signature

        spec = _checked_spec(metadata)
        example = np.asarray(input_example)  # (B, 1, S, S) uint8
        if example.dtype != np.uint8 or example.ndim != 4 or example.shape[1] != 1:
            raise ValueError(
                f"input_example must be a (B, 1, S, S) uint8 array, not {example.dtype} "
                f"{example.shape}"
            )
        example = np.repeat(example, 2, axis=0) if len(example) == 1 else example
        net = copy.deepcopy(unwrap(model)).to("cpu").eval()
        with torch.no_grad():
            logits = net(torch.from_numpy(example))  # (B, C) float
        log_pytorch = partial(
            mlflow.pytorch.log_model,
            net,
            name=MODEL_ARTIFACT_NAME,
            input_example=example,
            signature=infer_signature(example, logits.numpy()),
            metadata=spec,
            pip_requirements=model_requirements(),
        )
        with self._errors("log the model"), self._as_active_run():
            try:
                info = log_pytorch(serialization_format="pt2")
            except (MlflowException, OSError):
                raise
            except Exception as exc:  # torch.export could not trace the model
                log.warning("torch.export failed (%s); logging a pickled model", first_line(exc))
                logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)  # same warning again
                info = log_pytorch(serialization_format="pickle")
            with tempfile.TemporaryDirectory() as tmp:  # ctscan_spec.json beside MLmodel
                path = Path(tmp) / SPEC_ARTIFACT
                path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
                self.client.log_model_artifact(info.model_id, str(path))
            return self._register(info, spec, select_metric, float(select_value), higher_is_better)

    def _register(
        self, info: Any, spec: dict, select_metric: str, select_value: float, higher_is_better: bool
    ) -> dict:
        """Add a registry version for a logged model and decide on the champion alias."""
        name = self.settings.registered_model
        with _unless_error("RESOURCE_ALREADY_EXISTS"):
            self.client.create_registered_model(name)
        tags = {
            TAG_SELECT_METRIC: select_metric,
            TAG_SELECT_VALUE: repr(select_value),
            TAG_HIGHER_IS_BETTER: str(higher_is_better).lower(),
            TAG_RUN_ID: self.run_id,
            TAG_CLASS_NAMES: json.dumps(spec["class_names"]),
            TAG_MODEL_NAME: str(spec["model_name"]),
            TAG_CTSCAN_VERSION: str(spec["ctscan_version"]),
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

    @contextlib.contextmanager
    def _as_active_run(self) -> Iterator[None]:
        """This run as MLflow's active run for the block (a logged model belongs to the active
        run), then ended with the status it had."""
        import mlflow

        status = self.client.get_run(self.run_id).info.status
        with using_uri(self.uri), quiet():
            mlflow.start_run(run_id=self.run_id)
            try:
                yield
            finally:
                with contextlib.redirect_stdout(sys.stderr):  # MLflow prints run links on stdout
                    mlflow.end_run(status=status)

    def close(self, status: str = "FINISHED") -> None:
        """End the run with FINISHED, FAILED or KILLED (a second call does nothing)."""
        super().close(status)
        if self._closed or self.run_id is None:
            return
        self._closed = True
        with critical(), self._errors("end the run"), quiet():  # a stop never leaves it RUNNING
            self.client.set_terminated(self.run_id, status=status)


def open_tracker(
    tracking: TrackingSettings, *, runs_dir: Path, run_name: str | None = None, **record: Any
) -> Tracker:
    """A started run (`jobs.open_run_record` with the `record` options) when tracking is
    enabled, else a no-op Tracker."""
    tracker = MlflowTracker(tracking, runs_dir=runs_dir) if tracking.enabled else Tracker()
    return open_run_record(tracker, run_name=run_name, **record)


def _checked_spec(metadata: dict[str, Any]) -> dict[str, Any]:
    """A JSON round-trip copy of the model metadata, with every key of SPEC_KEYS."""
    if missing := [key for key in SPEC_KEYS if key not in metadata]:
        raise ValueError(
            f"model metadata lacks {', '.join(missing)} (needs {', '.join(SPEC_KEYS)})"
        )
    try:
        return json.loads(json.dumps(metadata))  # a NaN metric stays NaN (Python's JSON)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"model metadata is not JSON-ready: {exc}") from None


def load_model_spec(model_uri: str, tracking: TrackingSettings, runs_dir: Path) -> dict[str, Any]:
    """The ctscan metadata (class names, preprocessing spec, versions) of a logged MLflow model,
    looked up in the store `open_tracker` would use."""
    if urlsplit(model_uri).scheme.lower() not in ("models", "runs"):
        raise TrackingError(
            f"'{model_uri}' is not an MLflow model URI.",
            "write it as models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/model.",
        )
    uri, source = tracking_store.resolve_uri(tracking, runs_dir)
    where = f"'{uri}' (from {source})"
    db = tracking_store.sqlite_path(uri) if tracking_store.scheme_of(uri) == "sqlite" else None
    if db is not None and not db.is_file():
        raise TrackingError(
            f"there is no MLflow store at {where} to look up '{model_uri}'.",
            "train and register a model first (ctscan train), or point tracking.uri / "
            "MLFLOW_TRACKING_URI at the store that holds it.",
        )
    tracking_store.open_store(tracking, runs_dir)
    import mlflow.models
    from mlflow.exceptions import MlflowException

    with using_uri(uri), quiet():
        try:
            info = mlflow.models.get_model_info(model_uri)
        except (MlflowException, OSError) as exc:
            raise TrackingError(
                f"MLflow cannot find the model '{model_uri}' in {where}: {first_line(exc)}",
                "check the name, alias or version (MlflowClient().search_model_versions() lists "
                "them; the alias set by training is 'champion'), or point tracking.uri at the "
                "store that holds the model.",
            ) from None
    metadata = dict(info.metadata or {})
    if missing := [key for key in SPEC_KEYS if key not in metadata]:
        raise TrackingError(
            f"the MLflow model '{model_uri}' carries no ctscan metadata (missing: "
            f"{', '.join(missing)}).",
            "use a model registered by `ctscan train` of this version (retrain, or re-register "
            "from its checkpoint), or use the checkpoint itself.",
        )
    return metadata


def load_logged_model(
    model_uri: str, tracking: TrackingSettings, runs_dir: Path
) -> tuple[Any, dict[str, Any], str]:
    """A logged ctscan model, ready to call: (module for inference on the CPU, metadata, version).

    `version`: the registry version a `models:/` URI resolves to, or `run <id>` for `runs:/`.
    The pickled fallback of `log_model` needs MLFLOW_ALLOW_PICKLE_DESERIALIZATION (default true).
    """
    metadata = load_model_spec(model_uri, tracking, runs_dir)  # checks the URI and the store
    uri, source = tracking_store.resolve_uri(tracking, runs_dir)
    import zipfile

    _import_mlflow_pytorch()
    import mlflow.pytorch
    import torch
    from mlflow.environment_variables import MLFLOW_ALLOW_PICKLE_DESERIALIZATION
    from mlflow.exceptions import MlflowException

    with using_uri(uri), quiet():
        try:
            module = mlflow.pytorch.load_model(model_uri, map_location="cpu")
            version = _registry_version(model_uri)
        except (MlflowException, OSError, zipfile.BadZipFile) as exc:  # a truncated model.pt2 too
            fix = "check that its artifacts are reachable from this machine, or use the checkpoint."
            if not MLFLOW_ALLOW_PICKLE_DESERIALIZATION.get():  # MLflow refuses pickled models
                fix = (
                    "a pickled model (logged when torch.export failed) needs "
                    "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true: set it if you trust the store; "
                    + fix
                )
            raise TrackingError(
                f"MLflow cannot load the model '{model_uri}' from '{uri}' (from {source}): "
                f"{first_line(exc)}",
                fix,
            ) from None
    # pt2: a GraphModule traced in eval mode (its eval() raises in torch 2.14): as it is.
    # Pickled (log_model's fallback): ctscan's Deployable, a plain nn.Module: eval().
    module = module if isinstance(module, torch.fx.GraphModule) else module.eval()
    return module, metadata, version


def _import_mlflow_pytorch() -> None:
    """Import mlflow.pytorch without its side effect on logging: the import runs
    `logging.basicConfig(level=logging.ERROR)` (mlflow/pytorch/_lightning_autolog.py), which
    silenced every later warning of the process (the server's "drift monitoring is off")."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    import mlflow.pytorch  # noqa: F401

    root.setLevel(level)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)


def _registry_version(model_uri: str) -> str:
    """`models:/name/3` -> "3", `models:/name@alias` -> the version behind the alias."""
    import mlflow
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    if model_uri.startswith("runs:"):
        return f"run {model_uri.split(':/', 1)[1].lstrip('/').split('/', 1)[0]}"
    return str(get_model_name_and_version(mlflow.MlflowClient(), model_uri)[-1])

"""Experiment tracking: URI resolution, a real MLflow SQLite store, the registry, the champion."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from ctscan.engine.tracking import (
    CHAMPION_ALIAS,
    SPEC_ARTIFACT,
    TAG_CLASS_NAMES,
    TAG_CTSCAN_VERSION,
    TAG_MODEL_NAME,
    TAG_RESUMED_FROM,
    TAG_RUN_ID,
    TAG_SELECT_METRIC,
    TAG_SELECT_VALUE,
    MlflowTracker,
    Tracker,
    TrackingError,
    load_model_spec,
    model_requirements,
    open_tracker,
    promote_if_better,
)
from ctscan.engine.tracking_store import resolve_uri
from ctscan.errors import CtscanError, Interrupted, Terminated
from ctscan.models import unwrap
from ctscan.settings import TrackingSettings

SRC_DIR = Path(__file__).resolve().parents[2] / "src"


CLASS_NAMES = ["adenocarcinoma", "large_cell_carcinoma", "normal", "squamous_cell_carcinoma"]
PREPROCESS = {
    "image_size": 16,
    "resize": "pad",
    "mean": [0.5],
    "std": [0.25],
    "class_names": CLASS_NAMES,
    "channels": 1,
}
METADATA = {
    "class_names": CLASS_NAMES,
    "preprocess": PREPROCESS,
    "model_name": "tiny",
    "ctscan_version": "0.1.0",
    "checkpoint_sha256": "ab" * 32,
}


class TinyNet(torch.nn.Module):
    """A 4-class classifier of uint8 gray batches, small enough to log in well under a second."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, H, W) uint8 -> (B, 4)
        x = x.float() / 255
        return self.head(self.conv(x).mean(dim=(2, 3)))


class BranchyNet(TinyNet):
    """A model torch.export cannot trace: its control flow depends on the data."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if out.sum() > 0:
            return out
        return -out


def example(batch: int = 1, size: int = 16) -> np.ndarray:  # (B, 1, S, S) uint8
    return np.random.default_rng(batch).integers(0, 256, (batch, 1, size, size), dtype=np.uint8)


def log(tracker: Tracker, model: torch.nn.Module, value: float, **kwargs) -> dict | None:
    """log_model with the test metadata and a val_macro_f1 value."""
    kwargs = {"select_metric": "val_macro_f1", "metadata": METADATA} | kwargs
    return tracker.log_model(model, input_example=example(), select_value=value, **kwargs)


def resolve_tracking_uri(tracking: TrackingSettings, runs_dir: Path) -> str:
    return resolve_uri(tracking, runs_dir)[0]


def client_for(tracker: Tracker):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracker.uri)


def store_client(runs_dir: Path):
    """A client of the default store in `runs_dir`."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(runs_dir / 'mlflow.db').resolve()}")


# --- URI resolution (no mlflow needed) ----------------------------------------------------------


def test_uri_precedence_settings_over_env_over_default(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_tracking_uri(TrackingSettings(), tmp_path / "runs")
    assert default == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert default.startswith("sqlite:////")  # absolute path: independent of the cwd

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env-host:5000")
    assert resolve_tracking_uri(TrackingSettings(), tmp_path) == "http://env-host:5000"

    settings = TrackingSettings(uri="sqlite:///other/mlflow.db")
    assert resolve_tracking_uri(settings, tmp_path) == "sqlite:///other/mlflow.db"


@pytest.mark.parametrize(
    "uri",
    ["htp://localhost:5000", "s3://bucket/mlruns", "sqllite:///x.db", "ftp://host/x"],
)
def test_unknown_scheme_is_a_tracking_error_naming_the_uri(uri, tmp_path):
    with pytest.raises(TrackingError) as info:
        resolve_tracking_uri(TrackingSettings(uri=uri), tmp_path)
    assert isinstance(info.value, CtscanError)
    assert uri in info.value.message and "tracking.uri" in info.value.message
    assert "tracking.enabled=false" in info.value.fix


@settings(max_examples=30)
@given(
    scheme=st.sampled_from(["sqlite", "file", "http", "https", "postgresql+psycopg2", "mysql"]),
    host=st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True),
)
def test_known_schemes_are_accepted_verbatim(scheme, host):
    uri = f"{scheme}://{host}/x"
    assert resolve_tracking_uri(TrackingSettings(uri=f"  {uri} "), Path("runs")) == uri


# --- the disabled tracker ------------------------------------------------------------------------


def test_disabled_tracker_is_a_noop_and_never_imports_mlflow(tmp_path):
    code = f"""
import json, sys
from pathlib import Path
from ctscan.engine.tracking import Tracker, open_tracker
from ctscan.settings import TrackingSettings
runs_dir = Path({str(tmp_path / "runs")!r})
with open_tracker(TrackingSettings(enabled=False), runs_dir=runs_dir, run_name="x") as tracker:
    tracker.log_params({{"a": 1}})
    tracker.log_metrics({{"val_loss": 0.5}}, step=1)
    tracker.set_tags({{"k": "v"}})
    tracker.log_artifact(Path("nowhere.txt"))
    tracker.log_dict({{"a": 1}}, "a.json")
    model = tracker.log_model(
        object(), input_example=None, metadata={{}}, select_metric="m", select_value=1.0
    )
print(json.dumps({{"mlflow": "mlflow" in sys.modules, "type": type(tracker).__name__,
                  "run_id": tracker.run_id, "model": model, "runs_dir": runs_dir.exists()}}))
"""
    env = {**os.environ, "PYTHONPATH": f"{SRC_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        "mlflow": False,
        "type": "Tracker",
        "run_id": None,
        "model": None,
        "runs_dir": False,
    }


def test_disabled_tracker_checks_the_status_it_is_closed_with():
    tracker = Tracker()
    tracker.close("KILLED")
    with pytest.raises(ValueError, match="DONE"):
        tracker.close("DONE")


# --- user errors ---------------------------------------------------------------------------------


def test_unreachable_server_is_a_quick_tracking_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    with pytest.raises(TrackingError) as info:
        open_tracker(TrackingSettings(uri=uri), runs_dir=tmp_path)
    assert f"cannot reach the MLflow tracking server at '{uri}'" in info.value.message
    assert "mlflow server" in info.value.fix and "tracking.enabled=false" in info.value.fix
    assert os.environ.get("MLFLOW_TRACKING_URI") is None


def test_unwritable_runs_dir_is_a_tracking_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(TrackingError) as info:
        open_tracker(TrackingSettings(), runs_dir=blocker / "runs")
    assert str(blocker / "runs") in info.value.message
    assert "paths.runs_dir" in info.value.fix


def test_deleted_experiment_is_a_tracking_error_whose_fix_can_be_pasted(
    mlflow_runs_dir, tmp_path, caplog
):
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker:
        client = client_for(tracker)
    client.delete_experiment(tracker.experiment_id)
    with (
        caplog.at_level(logging.WARNING, logger="ctscan.engine.tracking"),
        pytest.raises(TrackingError, match="is deleted") as info,
    ):  # resuming its (deleted) run: the refusal only, no "starting a new run" before it
        open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir, recorded_id=tracker.run_id)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    command = info.value.fix.split("restore it (", 1)[1].split(") or set", 1)[0]
    assert command.startswith("MLFLOW_TRACKING_URI=")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    done = subprocess.run(  # pasted from another folder, with no store set in the environment
        ["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as again:
        assert again.experiment_id == tracker.experiment_id


def test_a_stop_as_a_run_is_created_waits_for_its_record_and_ends_it_killed(mlflow_runs_dir):
    """Ctrl-C right after the run is created: the caller's record is written first, then the
    stop acts and the run ends KILLED (not left RUNNING, nor active for MLflow's exit hook)."""
    import mlflow

    recorded: list[str] = []

    def record(run_id: str) -> None:
        signal.raise_signal(signal.SIGINT)  # held until the record is written
        recorded.append(run_id)

    with pytest.raises(KeyboardInterrupt):
        open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir, record=record)
    assert len(recorded) == 1
    assert mlflow.active_run() is None and "MLFLOW_TRACKING_URI" not in os.environ
    client = store_client(mlflow_runs_dir)
    assert client.get_run(recorded[0]).info.status == "KILLED"


def test_a_failure_after_the_run_is_created_ends_it_failed(mlflow_runs_dir):
    def record(run_id: str) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir, record=record)
    client = store_client(mlflow_runs_dir)
    (run,) = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], run_view_type=3
    )
    assert run.info.status == "FAILED"


# --- a real store --------------------------------------------------------------------------------


def test_params_metrics_tags_and_artifacts_reach_the_store(mlflow_runs_dir, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("hello")
    params = {f"train.p{i}": i for i in range(120)} | {"paths.none": None, "long": "x" * 7000}
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir, run_name="r1") as tracker:
        assert isinstance(tracker, MlflowTracker) and tracker.run_id
        tracker.log_params(params)
        for epoch, f1 in enumerate([0.2, 0.5, 0.4], start=1):
            tracker.log_metrics({"val_macro_f1": f1, "train_loss": np.float32(1 / epoch)}, epoch)
        tracker.set_tags({"model": "cnn", "device": "cpu"})
        tracker.log_artifact(note, artifact_path="notes")
        tracker.log_dict({"classes": ["a", "b"]}, "spec.json")

    client = client_for(tracker)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["train.p119"] == "119" and run.data.params["paths.none"] == "None"
    assert len(run.data.params["long"]) == 6000
    assert run.data.tags["model"] == "cnn" and run.data.tags["device"] == "cpu"
    history = client.get_metric_history(tracker.run_id, "val_macro_f1")
    assert [(m.step, m.value) for m in history] == [(1, 0.2), (2, 0.5), (3, 0.4)]
    assert run.data.metrics["train_loss"] == pytest.approx(1 / 3)
    paths = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert paths == {"notes", "spec.json"}
    local = Path(client.download_artifacts(tracker.run_id, "spec.json", str(tmp_path)))
    assert json.loads(local.read_text()) == {"classes": ["a", "b"]}
    assert (Path(client.download_artifacts(tracker.run_id, "notes/note.txt")).read_text()) == (
        "hello"
    )
    # artifacts live next to the store, not in ./mlruns of the cwd
    experiment = client.get_experiment(tracker.experiment_id)
    assert experiment.artifact_location == (mlflow_runs_dir / "mlartifacts").resolve().as_uri()
    assert (mlflow_runs_dir / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()


def test_tracker_restores_the_process_uri_so_a_second_store_is_used(
    mlflow_runs_dir, mlflow_db_template, tmp_path
):
    other = tmp_path / "other-runs"
    other.mkdir()
    shutil.copyfile(mlflow_db_template, other / "mlflow.db")  # a migrated store: faster
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as first:
        assert "MLFLOW_TRACKING_URI" not in os.environ  # runs go through the client
    assert first.uri != f"sqlite:///{(other / 'mlflow.db').resolve()}"
    second = open_tracker(TrackingSettings(experiment="second"), runs_dir=other)
    second.close()
    assert second.uri == f"sqlite:///{(other / 'mlflow.db').resolve()}"
    assert (other / "mlflow.db").is_file()


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (RuntimeError("boom"), "FAILED"),
        (KeyboardInterrupt(), "KILLED"),
        (Terminated(), "KILLED"),
        (Interrupted("training stopped by Ctrl-C"), "KILLED"),  # a stopped fold, in its parent
        (CtscanError("bad input"), "FAILED"),
    ],
)
def test_a_run_ended_by_an_exception_is_failed_or_killed(mlflow_runs_dir, error, status):
    with (
        pytest.raises(type(error)),
        open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker,
    ):
        raise error
    assert client_for(tracker).get_run(tracker.run_id).info.status == status


def test_close_is_idempotent_and_checks_the_status(mlflow_runs_dir):
    tracker = open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir)
    with pytest.raises(ValueError, match="DONE"):
        tracker.close("DONE")
    tracker.close("KILLED")
    tracker.close("FINISHED")  # no effect: the run is already ended
    tracker.log_metrics({"test_accuracy": 0.75}, step=3)  # an ended run still takes values
    run = client_for(tracker).get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.metrics["test_accuracy"] == 0.75


# --- resumed runs --------------------------------------------------------------------------------


def test_a_resumed_run_continues_the_interrupted_run(mlflow_runs_dir):
    first = open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir, run_name="r")
    for step in (1, 2):
        first.log_metrics({"val_loss": 1.0 / step}, step)
    first.close("KILLED")
    client = client_for(first)
    assert client.get_run(first.run_id).info.status == "KILLED"

    with open_tracker(
        TrackingSettings(), runs_dir=mlflow_runs_dir, run_name="ignored", recorded_id=first.run_id
    ) as second:
        assert second.run_id == first.run_id
        assert second.experiment_id == first.experiment_id
        assert client.get_run(first.run_id).info.status == "RUNNING"
        for step in (3, 4):
            second.log_metrics({"val_loss": 1.0 / step}, step)

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    history = client.get_metric_history(first.run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [(s, 1.0 / s) for s in (1, 2, 3, 4)]
    assert len(client.search_runs([first.experiment_id])) == 1
    assert TAG_RESUMED_FROM not in run.data.tags


def test_a_parent_run_in_another_experiment_is_refused_not_reopened(mlflow_runs_dir):
    """Children start in tracking.experiment: a parent recorded elsewhere would lose them."""

    recorded: list[str] = []

    def parent(experiment: str, recorded_id: str | None):
        return open_tracker(
            TrackingSettings(experiment=experiment),
            runs_dir=mlflow_runs_dir,
            run_name="cv5-x",
            recorded_id=recorded_id,
            tags={"kind": "cv"},
            params={"cv.folds": 5},
            experiment_fix=lambda name: f"set {name} or another --out.",
            record=recorded.append,
        )

    first = parent("a", None)
    assert recorded == [first.run_id]
    first.close("KILLED")
    client = client_for(first)
    with pytest.raises(TrackingError) as err:
        parent("b", first.run_id)
    assert "is in experiment 'a', but tracking.experiment is now 'b'" in err.value.message
    assert err.value.fix == "set a or another --out."
    assert client.get_run(first.run_id).info.status == "KILLED"  # not reopened
    assert client.get_experiment_by_name("b") is None  # nothing created
    again = parent("a", first.run_id)
    with again:
        assert again.run_id == first.run_id and again.reopened
    assert recorded == [first.run_id]  # a reopened parent is not recorded again
    run = client.get_run(first.run_id)
    assert run.data.params == {"cv.folds": "5"} and run.data.tags["kind"] == "cv"


def test_a_child_run_is_reopened_only_in_tracking_experiment(mlflow_runs_dir, caplog):
    """A fold or trial continues under a parent in tracking.experiment: its run recorded in
    another experiment is left alone and a new, tagged one is started."""
    parent = open_tracker(TrackingSettings(experiment="b"), runs_dir=mlflow_runs_dir)
    parent.close()
    first = open_tracker(TrackingSettings(experiment="a"), runs_dir=mlflow_runs_dir)
    first.close("KILLED")
    with (
        caplog.at_level(logging.WARNING, logger="ctscan.engine.tracking"),
        open_tracker(
            TrackingSettings(experiment="b"),
            runs_dir=mlflow_runs_dir,
            recorded_id=first.run_id,
            parent_run_id=parent.run_id,
        ) as second,
    ):
        pass
    client = client_for(first)
    assert second.run_id != first.run_id
    assert client.get_experiment(second.experiment_id).name == "b"
    assert client.get_run(second.run_id).data.tags[TAG_RESUMED_FROM] == first.run_id
    assert client.get_run(first.run_id).info.status == "KILLED"
    assert "is in experiment 'a', not tracking.experiment 'b'" in caplog.text
    with open_tracker(  # in its own experiment it is reopened
        TrackingSettings(experiment="a"),
        runs_dir=mlflow_runs_dir,
        recorded_id=first.run_id,
        parent_run_id=parent.run_id,
    ) as third:
        assert third.run_id == first.run_id


@pytest.mark.parametrize("name", ["2024", "true", "it's mine", "ctscan"])
def test_the_experiment_fix_can_be_pasted(name: str) -> None:
    """The fix cv and the sweep give is a --set that keeps the name a string in the shell (the
    sweep takes --set since it runs on Optuna's machinery), then the job's own way out."""
    import shlex

    from ctscan.jobs import experiment_fix
    from ctscan.settings import load_settings

    fix = experiment_fix(name, new="a new study (--name)")
    assert fix.endswith(", or start a new study (--name)."), fix
    words = shlex.split(fix.split("--set ", 1)[1].split(",")[0])
    assert load_settings([], words).tracking.experiment == name, fix


@pytest.mark.parametrize("missing", ["0123456789abcdef0123456789abcdef", "not-a-run-id"])
def test_resuming_a_run_this_store_lacks_starts_a_tagged_new_run(mlflow_runs_dir, caplog, missing):
    with (
        caplog.at_level(logging.WARNING, logger="ctscan.engine.tracking"),
        open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir, recorded_id=missing) as tracker,
    ):
        tracker.log_metrics({"val_loss": 0.5}, 3)
    assert tracker.run_id != missing
    run = client_for(tracker).get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_RESUMED_FROM] == missing
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert missing in warnings[0] and "not in this tracking store" in warnings[0]


def test_resuming_a_deleted_run_starts_a_new_run(mlflow_runs_dir, caplog):
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as first:
        pass
    client_for(first).delete_run(first.run_id)
    with (
        caplog.at_level(logging.WARNING, logger="ctscan.engine.tracking"),
        open_tracker(
            TrackingSettings(), runs_dir=mlflow_runs_dir, recorded_id=first.run_id
        ) as second,
    ):
        pass
    assert second.run_id != first.run_id
    assert client_for(second).get_run(second.run_id).data.tags[TAG_RESUMED_FROM] == first.run_id
    assert "is deleted" in caplog.text


# --- the model registry --------------------------------------------------------------------------


@pytest.mark.slow  # the first torch.export of a session: about 3-10 s here
def test_log_model_registers_a_loadable_version_with_example_and_requirements(
    mlflow_runs_dir, tmp_path
):
    import mlflow.pytorch

    model = TinyNet()
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker:
        result = log(tracker, model, 0.6)
    assert result is not None
    assert result["name"] == "ctscan-classifier" and result["version"] == 1
    assert result["promoted"] is True
    assert (result["champion_version"], result["champion_value"]) == (1, 0.6)

    client = client_for(tracker)
    version = client.get_model_version("ctscan-classifier", "1")
    assert version.run_id == tracker.run_id
    assert version.tags[TAG_SELECT_METRIC] == "val_macro_f1"
    assert float(version.tags[TAG_SELECT_VALUE]) == 0.6
    assert version.tags[TAG_RUN_ID] == tracker.run_id

    source = client.get_model_version_download_uri("ctscan-classifier", "1")
    assert source.startswith((mlflow_runs_dir / "mlartifacts").resolve().as_uri())
    local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["saved_input_example_info"]["type"] == "ndarray"
    assert (local / mlmodel["saved_input_example_info"]["artifact_path"]).is_file()
    assert (local / "data" / "model.pt2").is_file()  # torch.export format, no pickle
    requirements = (local / "requirements.txt").read_text().split()
    assert requirements == model_requirements()
    assert f"torch=={torch.__version__.split('+')[0]}" in requirements

    assert model.training  # the caller's model was copied, not switched to eval mode
    loaded = mlflow.pytorch.load_model(str(local))
    batch = torch.from_numpy(example(batch=3))  # another batch size: the batch dim is dynamic
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model.eval()(batch))


@pytest.mark.slow
def test_the_registered_model_carries_its_spec_and_a_uint8_signature(mlflow_runs_dir, tmp_path):
    import mlflow
    import mlflow.pytorch

    model = TinyNet().eval()
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker:
        log(tracker, model, 0.6)
    mlflow.set_tracking_uri(tracker.uri)  # cleared by the fixture
    champion_uri = "models:/ctscan-classifier@champion"

    # usable on its own: uint8 images in, the module's logits out, any batch size
    loaded = mlflow.pytorch.load_model(champion_uri)
    batch = torch.from_numpy(example(batch=3))  # (3, 1, 16, 16) uint8
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))

    info = mlflow.models.get_model_info(champion_uri)
    assert info.metadata == METADATA  # (a) in the MLmodel file
    (spec,) = info.signature.inputs.inputs
    assert (spec.type, spec.shape) == (np.dtype("uint8"), (-1, 1, 16, 16))
    (out,) = info.signature.outputs.inputs
    assert out.shape == (-1, 4)

    # (b) ctscan_spec.json beside the MLmodel file
    local = Path(mlflow.artifacts.download_artifacts(champion_uri, dst_path=str(tmp_path)))
    assert json.loads((local / SPEC_ARTIFACT).read_text()) == METADATA
    assert (local / "MLmodel").is_file()

    # (c) tags on the registered version
    version = client_for(tracker).get_model_version("ctscan-classifier", "1")
    assert json.loads(version.tags[TAG_CLASS_NAMES]) == CLASS_NAMES
    assert version.tags[TAG_MODEL_NAME] == "tiny"
    assert version.tags[TAG_CTSCAN_VERSION] == "0.1.0"

    # the reader resolves every URI form through the project's tracking settings
    mlflow.set_tracking_uri(None)
    for uri in (champion_uri, "models:/ctscan-classifier/1", f"runs:/{tracker.run_id}/model"):
        assert load_model_spec(uri, TrackingSettings(), mlflow_runs_dir) == METADATA
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_log_model_refuses_a_float_example_and_incomplete_metadata(mlflow_runs_dir):
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker:
        with pytest.raises(ValueError, match="uint8"):
            tracker.log_model(
                TinyNet(),
                input_example=example().astype(np.float32),
                metadata=METADATA,
                select_metric="val_loss",
                select_value=0.1,
            )
        incomplete = {k: v for k, v in METADATA.items() if k != "checkpoint_sha256"}
        with pytest.raises(ValueError, match="checkpoint_sha256"):
            log(tracker, TinyNet(), 0.5, metadata=incomplete)
    assert client_for(tracker).search_registered_models() == []


@pytest.mark.parametrize(
    ("model_uri", "expected"),
    [
        ("models:/nope@champion", "cannot find the model 'models:/nope@champion'"),
        ("models:/ctscan-classifier/9", "cannot find the model 'models:/ctscan-classifier/9'"),
        ("s3://bucket/model", "is not an MLflow model URI"),
    ],
)
def test_load_model_spec_of_a_missing_model_is_a_tracking_error(
    mlflow_runs_dir, model_uri, expected
):
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(TrackingSettings(), mlflow_runs_dir)
    MlflowClient(tracking_uri=uri).create_registered_model("ctscan-classifier")  # no versions
    with pytest.raises(TrackingError) as info:
        load_model_spec(model_uri, TrackingSettings(), mlflow_runs_dir)
    assert expected in info.value.message and info.value.fix
    assert "MLFLOW_TRACKING_URI" not in os.environ


def test_load_model_spec_without_a_store_is_a_tracking_error(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("CTSCAN_TRACKING__URI", raising=False)
    with pytest.raises(TrackingError, match="no MLflow store") as info:
        load_model_spec("models:/m@champion", TrackingSettings(), tmp_path / "runs")
    assert "ctscan train" in info.value.fix
    assert not (tmp_path / "runs").exists()  # looking up creates nothing


def test_load_model_spec_of_a_model_without_ctscan_metadata_is_a_tracking_error(
    mlflow_runs_dir,
):
    import mlflow
    import mlflow.pytorch

    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker:
        pass
    mlflow.set_tracking_uri(tracker.uri)  # a model logged by hand, as an older ctscan did
    with mlflow.start_run(run_id=tracker.run_id):
        mlflow.pytorch.log_model(
            TinyNet(),
            name="model",
            serialization_format="pickle",
            pip_requirements=["torch"],
            registered_model_name="plain",
        )
    mlflow.set_tracking_uri(None)
    with pytest.raises(TrackingError, match="carries no ctscan metadata") as info:
        load_model_spec("models:/plain/1", TrackingSettings(), mlflow_runs_dir)
    assert "class_names" in info.value.message and "checkpoint" in info.value.fix


def test_champion_moves_on_a_better_value_and_stays_on_a_worse_one(mlflow_runs_dir):
    with open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker:
        results = [log(tracker, TinyNet(), value) for value in (0.5, 0.4, 0.5)]
    # after close, as the training loop does: the ended run is resumed for the model, then
    # ended again with its status, and the process-wide URI is left as it was
    results.append(log(tracker, TinyNet(), 0.7))
    assert client_for(tracker).get_run(tracker.run_id).info.status == "FINISHED"
    assert "MLFLOW_TRACKING_URI" not in os.environ
    version = client_for(tracker).get_model_version("ctscan-classifier", "4")
    assert version.run_id == tracker.run_id
    logged_model = client_for(tracker).get_logged_model(version.source.removeprefix("models:/"))
    assert logged_model.source_run_id == tracker.run_id
    assert [r["promoted"] for r in results] == [True, False, False, True]  # a tie does not move it
    assert [r["champion_version"] for r in results] == [1, 1, 1, 4]
    assert [r["champion_value"] for r in results] == [0.5, 0.5, 0.5, 0.7]
    champion = client_for(tracker).get_model_version_by_alias("ctscan-classifier", CHAMPION_ALIAS)
    assert champion.version == 4


def test_log_model_setting_off_logs_nothing(mlflow_runs_dir):
    settings = TrackingSettings(log_model=False)
    with open_tracker(settings, runs_dir=mlflow_runs_dir) as tracker:
        result = log(tracker, TinyNet(), 0.1)
    assert result is None
    assert client_for(tracker).search_registered_models() == []


@pytest.mark.slow
def test_a_model_torch_export_cannot_trace_is_pickled_instead(mlflow_runs_dir, tmp_path, caplog):
    import mlflow

    with (
        caplog.at_level(logging.WARNING, logger="ctscan.engine.tracking"),
        open_tracker(TrackingSettings(), runs_dir=mlflow_runs_dir) as tracker,
    ):
        result = log(tracker, BranchyNet(), 0.3, select_metric="val_loss", higher_is_better=False)
    assert result["version"] == 1 and result["promoted"] is True
    assert "torch.export failed" in caplog.text
    source = client_for(tracker).get_model_version_download_uri("ctscan-classifier", "1")
    local = Path(mlflow.artifacts.download_artifacts(source, dst_path=str(tmp_path)))
    assert (local / "data" / "model.pth").is_file()
    assert json.loads((local / SPEC_ARTIFACT).read_text()) == METADATA
    assert yaml.safe_load((local / "MLmodel").read_text())["metadata"] == METADATA


def test_unwrap_removes_compile_and_ddp_style_wrappers():
    inner = TinyNet()
    wrapper = torch.nn.Module()
    wrapper._orig_mod = inner
    assert unwrap(wrapper) is inner
    assert unwrap(inner) is inner


# --- promote_if_better ---------------------------------------------------------------------------


@pytest.fixture
def registry(mlflow_runs_dir):
    """A client on the test store and a function adding a version tagged with a value."""
    from mlflow import MlflowClient

    uri = resolve_tracking_uri(TrackingSettings(), mlflow_runs_dir)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_registered_model("m")

    def add(value: float | None, metric: str = "val_loss") -> str:
        tags = {TAG_SELECT_METRIC: metric}
        if value is not None:
            tags[TAG_SELECT_VALUE] = repr(value)
        return str(client.create_model_version("m", source="/nowhere", tags=tags).version)

    return client, add


def champion_of(client) -> str:
    return str(client.get_model_version_by_alias("m", CHAMPION_ALIAS).version)


def test_promote_lower_is_better(registry):
    client, add = registry
    assert promote_if_better(client, "m", add(0.5), 0.5, higher_is_better=False, metric="val_loss")
    v2 = add(0.6)
    assert not promote_if_better(client, "m", v2, 0.6, higher_is_better=False, metric="val_loss")
    v3 = add(0.3)
    assert promote_if_better(client, "m", v3, 0.3, higher_is_better=False, metric="val_loss")
    assert champion_of(client) == v3


def test_promote_never_on_nan_nor_for_the_champion_itself(registry):
    client, add = registry
    v1 = add(0.5)
    assert not promote_if_better(client, "m", v1, math.nan)
    assert promote_if_better(client, "m", v1, 0.5)
    assert not promote_if_better(client, "m", v1, 0.5)
    assert champion_of(client) == v1


@pytest.mark.parametrize(("metric", "value"), [("val_accuracy", 0.2), ("val_loss", None)])
def test_an_incomparable_champion_keeps_the_alias_with_a_warning(registry, caplog, metric, value):
    client, add = registry
    v1 = add(value, metric=metric)
    client.set_registered_model_alias("m", CHAMPION_ALIAS, v1)
    v2 = add(0.9, metric="val_loss")
    with caplog.at_level(logging.WARNING, logger="ctscan.engine.tracking"):
        assert not promote_if_better(client, "m", v2, 0.9, metric="val_loss")
    assert champion_of(client) == v1
    assert "not comparable" in caplog.text and "set_registered_model_alias" in caplog.text


def test_loading_a_logged_model_leaves_the_process_logging_as_it_was() -> None:
    """`import mlflow.pytorch` calls logging.basicConfig(level=ERROR): done plainly, it
    silenced every later warning of a server that loads a models:/ URI. Each in a fresh
    process: the first shows the side effect is real, the second that ctscan undoes it."""
    check = "import logging; {imp}; r = logging.getLogger(); print(r.level, len(r.handlers))"
    plain = check.format(imp="import mlflow.pytorch")
    ours = check.format(
        imp="from ctscan.engine.tracking import _import_mlflow_pytorch; _import_mlflow_pytorch()"
    )
    out = [
        subprocess.run([sys.executable, "-c", c], capture_output=True, text=True, check=True)
        for c in (plain, ours)
    ]
    assert out[0].stdout.split() == [str(logging.ERROR), "1"]
    assert out[1].stdout.split() == [str(logging.WARNING), "0"]


def test_a_broken_logged_model_file_is_one_tracking_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A truncated model.pt2 in the artifact store (torch.export.load: BadZipFile) is one line
    naming the URI, not a traceback."""
    import zipfile

    import mlflow.pytorch

    from ctscan.engine import tracking

    def broken(*args: object, **kwargs: object) -> None:
        raise zipfile.BadZipFile("File is not a zip file")

    monkeypatch.setattr(tracking, "load_model_spec", lambda *a: {})
    monkeypatch.setattr(mlflow.pytorch, "load_model", broken)
    settings = TrackingSettings(uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(TrackingError) as err:
        tracking.load_logged_model("models:/ctscan-classifier/1", settings, tmp_path)
    assert "models:/ctscan-classifier/1" in str(err.value) and "not a zip file" in str(err.value)

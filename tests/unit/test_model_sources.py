"""Every model source the docs name, through the user's doors: `ctscan predict` and `ctscan serve`.

One tiny cnn_gap (1 epoch, 32 px, synthetic store) is trained with tracking on into a real SQLite
MLflow store, so training registers it as `models:/ctscan-classifier@champion` in torch.export's
`pt2` format. The same best.pt is logged once more as `ctscan-pickled` with torch.export failing
(the pickled fallback of `MlflowTracker.log_model`), exported to ONNX, and made a one-member
ensemble with a flip. Each source, run by `ctscan predict` (through Typer's runner in this
process: a fresh interpreter per source would only import torch again) and the registry models
by a real server in a process of its own, must give the answers of its reference opened in this
process: best.pt for the MLflow models and the ONNX file, the ensemble checkpoint for the
ensemble. The refusal of a pickled model is a process of its own too (its exit code and line).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ctscan.inference import open_predictor
from tests.processes import ctscan_in_process
from tests.serve_helpers import clean_env, live_server, png_bytes, sample_images
from tests.unit.conftest_mlflow import MLFLOW_ENV, copy_mlflow_store
from tests.unit.conftest_store import engine_overrides, engine_settings, write_synthetic_store

SIZE = 32
TORCH_TOL = 1e-5  # the same weights on torch: eager module, exported graph, pickled module
ONNX_TOL = 1e-4  # ONNX Runtime's kernels against torch's (export parity: logits within 1e-4)
# the model sources the README, inference.md, serving.md, export.md and ensemble.md name:
# key -> (MODEL as written, the reference it must answer as, the tolerance)
SOURCES = {
    "checkpoint": ("best.pt", "checkpoint", ONNX_TOL),  # predict runs it on its ONNX export
    "onnx": ("best.onnx", "checkpoint", ONNX_TOL),
    "ensemble": ("ensemble.pt", "ensemble", ONNX_TOL),
    "models-alias": ("models:/ctscan-classifier@champion", "checkpoint", TORCH_TOL),
    "models-version": ("models:/ctscan-classifier/1", "checkpoint", TORCH_TOL),
    "runs": ("runs:/{run_id}/model", "checkpoint", TORCH_TOL),
    "models-pickled": ("models:/ctscan-pickled@champion", "checkpoint", TORCH_TOL),
}


@dataclass(frozen=True)
class Sources:
    """The trained model in every form, and the slices to predict."""

    root: Path
    store: Path
    runs_dir: Path  # holds mlflow.db, the store the MLflow URIs resolve in
    files: dict[str, Path]  # best.pt, best.onnx, ensemble.pt
    run_id: str
    images: list[Path]

    def model(self, key: str) -> str:
        """MODEL as a user writes it for this source."""
        text = SOURCES[key][0].format(run_id=self.run_id)
        return str(self.files[text]) if text in self.files else text

    def settings(self):
        """The settings the CLI gets through `sets()`."""
        return engine_settings(self.store, self.runs_dir, SIZE)

    def sets(self) -> list[str]:
        """`--set` arguments: the synthetic store, runs_dir (the MLflow store), CPU, 1 thread."""
        return [
            a for item in engine_overrides(self.store, self.runs_dir, SIZE) for a in ("--set", item)
        ]


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> Sources:
    """One training with tracking on (pt2 registered), a pickled copy, ONNX, an ensemble."""
    import mlflow
    import torch

    from ctscan.engine.tracking import open_tracker
    from ctscan.engine.train import log_best_model, run_training
    from ctscan.ops.ensemble import build_ensemble
    from ctscan.ops.export import cached_onnx

    root = tmp_path_factory.mktemp("sources")
    runs_dir = copy_mlflow_store(mlflow_db_template, root / "runs")
    store = write_synthetic_store(root / "processed", size=SIZE)
    with pytest.MonkeyPatch.context() as patch:
        for var in MLFLOW_ENV:
            patch.delenv(var, raising=False)
        patch.chdir(root)
        settings = engine_settings(
            store,
            runs_dir,
            SIZE,
            **{"train.epochs": 1, "train.evaluate_test": "false", "tracking.enabled": "true"},
        )
        result = run_training(settings, out_dir=root / "run")
        assert result is not None and result.model_version["model_uri"] == (
            "models:/ctscan-classifier/1"
        )

        def untraceable(*args: object, **kwargs: object) -> None:
            raise RuntimeError("torch.export cannot trace this model")

        patch.setattr(torch.export, "export", untraceable)  # as for a data-dependent branch
        pickled = settings.tracking.model_copy(update={"registered_model": "ctscan-pickled"})
        with open_tracker(pickled, runs_dir=runs_dir) as tracker:
            log_best_model(settings, result.best_path, tracker, result.best_value)
        mlflow.set_tracking_uri(None)
    ensemble = build_ensemble(
        settings, [result.best_path], out=root / "ens" / "ensemble.pt", flips=("hflip",)
    )
    onnx = cached_onnx(result.best_path, settings)  # the export predict and serve run on
    images = []
    for i, image in enumerate(sample_images(4, size=SIZE, seed=7)):
        images.append(root / "slices" / f"slice{i}.png")
        images[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(images[-1])
    files = {"best.pt": result.best_path, "best.onnx": onnx, "ensemble.pt": ensemble.checkpoint}
    return Sources(root, store, runs_dir, files, result.run_id, images)


@pytest.fixture(scope="module")
def expected(sources: Sources) -> dict[str, list[tuple[str, dict[str, float]]]]:
    """(label, probabilities) per image from each reference, opened in this process."""
    out = {}
    for name, path in (("checkpoint", "best.pt"), ("ensemble", "ensemble.pt")):
        predictor = open_predictor(sources.files[path], settings=sources.settings())
        out[name] = [(p.label, p.probabilities) for p in predictor.predict_files(sources.images)]
    return out


def _same(label: str, probabilities: dict[str, float], want: tuple, tol: float) -> None:
    assert label == want[0]
    assert list(probabilities) == list(want[1])  # the class names, in the model's order
    for name, p in want[1].items():
        assert abs(probabilities[name] - p) <= tol, (name, probabilities[name], p)


@pytest.mark.slow
@pytest.mark.parametrize("key", list(SOURCES))
def test_predict_answers_as_the_reference_for_every_model_source(
    sources: Sources, expected: dict, key: str
) -> None:
    model = sources.model(key)
    args = ("predict", *map(str, sources.images), "--model", model, "--json", *sources.sets())
    done = ctscan_in_process(*args, cwd=sources.root)
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["path"] for r in rows] == [str(p) for p in sources.images]
    _, reference, tol = SOURCES[key]
    for row, want in zip(rows, expected[reference], strict=True):
        _same(row["label"], row["probabilities"], want, tol)
        assert row["model"]["source"] == model
    info = rows[0]["model"]
    if model.startswith(("models:/", "runs:/")):
        assert (info["format"], info["backend"]) == ("mlflow", "torch")
        assert info["sha256"] == _sha256(sources.files["best.pt"])  # the model it came from
        assert info["version"] == (f"run {sources.run_id}" if key == "runs" else "1")
    else:
        assert (info["format"], info["backend"]) == ("onnx", "onnx")  # a checkpoint: its export


@pytest.mark.slow
@pytest.mark.parametrize("key", ["models-alias", "models-pickled"])
def test_serve_answers_an_mlflow_model_as_its_checkpoint(
    sources: Sources, expected: dict, key: str
) -> None:
    model = sources.model(key)
    with live_server(model, runs_dir=sources.runs_dir) as server, server.client() as client:
        ready = client.get("/ready").json()
        assert ready["model"]["format"] == "mlflow" and ready["model"]["version"] == "1"
        for path, want in zip(sources.images, expected["checkpoint"], strict=True):
            with Image.open(path) as img:
                png = png_bytes(np.asarray(img))
            reply = client.post("/predict", files={"file": (path.name, png)})
            assert reply.status_code == 200, reply.text
            body = reply.json()
            _same(body["label"], body["probabilities"], want, TORCH_TOL)
        explain = client.post("/explain", files={"file": ("a.png", png)})
    # Grad-CAM hooks a layer of the network: the pickled module has it, the pt2 graph has not
    assert explain.status_code == (200 if key == "models-pickled" else 501), explain.text


@pytest.mark.slow
def test_a_pickled_model_mlflow_may_not_unpickle_is_one_line_with_the_fix(
    sources: Sources,
) -> None:
    model = sources.model("models-pickled")
    done = _ctscan(
        sources,
        *("predict", str(sources.images[0]), "--model", model),
        env={"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"},
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("ctscan: error: ") and done.stderr.count("\n") == 1
    assert "Deserializing model using pickle is disallowed" in done.stderr
    assert "Fix: a pickled model" in done.stderr
    assert "MLFLOW_ALLOW_PICKLE_DESERIALIZATION=true" in done.stderr


def _ctscan(sources: Sources, *args: str, env: dict[str, str] | None = None):
    """`python -m ctscan ARGS --set ...` (the sources' settings), without CTSCAN_/MLFLOW_ env."""
    return subprocess.run(
        [sys.executable, "-m", "ctscan", *args, *sources.sets()],
        capture_output=True,
        text=True,
        env=clean_env(env),
        cwd=sources.root,
    )


def _sha256(path: Path) -> str:
    from ctscan.files import file_sha256

    return file_sha256(path)

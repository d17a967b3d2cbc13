"""Same answer everywhere, on the real images: the server (torch and ONNX), predict, evaluate.

The real data preprocessed at 64 px, cnn_gap trained 3 epochs on it (both shared with
test_export_real: conftest_real.py), then 40 test-split files answered by: `ctscan serve
--backend torch` (/predict and /v2/.../infer through tritonclient), `ctscan serve --backend
onnx` (the checkpoint exported on start-up; the same two routes), `ctscan predict --json` and
`ctscan evaluate --json` (its "predictions", computed from the store's preprocessed images; both
commands run in this process through Typer's runner, which spares two interpreters that would
import torch again). On one backend every answer agrees to 1e-5; ONNX Runtime agrees with
PyTorch to 1e-4.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ctscan.cli import app
from ctscan.data.store import load_store
from tests.serve_helpers import live_server, toml_str

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIZE = 64
N_IMAGES = 40
SAME_BACKEND_ATOL = 1e-5
ONNX_VS_TORCH_ATOL = 1e-4


@pytest.fixture(scope="module")
def trained(
    real_store_64: Path, real_checkpoint_64: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    """The real store at 64 px and best.pt of a 3-epoch cnn_gap run on it (conftest_real.py,
    shared: read-only); a runs folder of this module's own for the servers' ONNX exports."""
    root = tmp_path_factory.mktemp("serve-real")
    return {
        "root": root,
        "store": real_store_64,
        "runs": root / "runs",
        "checkpoint": real_checkpoint_64,
    }


def _cli_json(*args: str) -> str:
    """A ctscan command run in this process; its stdout (it must exit 0)."""
    unset = {k: None for k in os.environ if k.startswith(("CTSCAN_", "MLFLOW_"))}
    result = CliRunner(env=unset).invoke(app, list(args))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    return result.stdout


def _served(
    checkpoint: Path, runs: Path, backend: str, files: list[Path], log: Path
) -> tuple[np.ndarray, np.ndarray, str]:
    """(/predict probabilities, /v2 infer probabilities, the backend the server reports)."""
    import tritonclient.http as triton_http

    with live_server(
        checkpoint,
        runs_dir=runs,
        args=("--backend", backend),
        overrides={"serve.max_batch_files": "64"},
        log=log,
    ) as server:
        rows = []
        with server.client() as client:
            for path in files:
                response = client.post("/predict", files={"file": (path.name, path.read_bytes())})
                assert response.status_code == 200, response.text
                rows.append(list(response.json()["probabilities"].values()))
            reported = client.get("/ready").json()["model"]["backend"]
        triton = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
        try:
            data = np.array([p.read_bytes() for p in files], dtype=np.object_)
            infer_input = triton_http.InferInput("image_bytes", [len(files)], "BYTES")
            infer_input.set_data_from_numpy(data, binary_data=True)
            result = triton.infer("ctscan", [infer_input])
            infer = result.as_numpy("probabilities").astype(np.float64)
        finally:
            triton.close()
    return np.array(rows), infer, reported


def test_every_path_gives_the_same_probabilities(
    trained: dict[str, Path], real_raw_dir: Path
) -> None:
    pytest.importorskip("tritonclient.http", reason="pip install tritonclient[http]")
    store = load_store(trained["store"])
    names = list(store.spec.class_names)
    rel_paths = store.split("test").paths[:: max(1, len(store.split("test").paths) // N_IMAGES)]
    rel_paths = rel_paths[:N_IMAGES]
    files = [real_raw_dir / rel for rel in rel_paths]
    assert len(files) == N_IMAGES and all(f.is_file() for f in files)
    root, checkpoint = trained["root"], trained["checkpoint"]
    common = [
        "--set",
        f"paths.processed_dir={toml_str(trained['store'])}",
        "--set",
        f"paths.runs_dir={toml_str(trained['runs'])}",
        "--set",
        f"data.image_size={SIZE}",
        "--set",
        "tracking.enabled=false",
    ]
    torch_predict, torch_infer, backend = _served(
        checkpoint, trained["runs"], "torch", files, root / "serve-torch.log"
    )
    assert backend == "torch"
    onnx_predict, onnx_infer, backend = _served(
        checkpoint, trained["runs"], "onnx", files, root / "serve-onnx.log"
    )
    assert backend == "onnx"

    predicted = _cli_json(
        "predict", *map(str, files), "--model", str(checkpoint), "--json", "--quiet", *common
    )
    by_path = {}
    for line in predicted.splitlines():
        row = json.loads(line)
        by_path[row["path"]] = [row["probabilities"][n] for n in names]
    cli_predict = np.array([by_path[str(f)] for f in files])
    report = json.loads(
        _cli_json("evaluate", str(checkpoint), "--json", "--out", str(root / "eval"), *common)
    )
    evaluated = {row["path"]: row for row in report["predictions"]}
    cli_evaluate = np.array(
        [[evaluated[rel]["probabilities"][n] for n in names] for rel in rel_paths]
    )

    for name, answer in {
        "/predict": torch_predict,
        "/v2 infer": torch_infer,
        "ctscan predict": cli_predict,
    }.items():
        assert np.abs(answer - cli_evaluate).max() <= SAME_BACKEND_ATOL, name
    assert np.abs(onnx_infer - onnx_predict).max() <= SAME_BACKEND_ATOL
    assert np.abs(onnx_predict - torch_predict).max() <= ONNX_VS_TORCH_ATOL
    assert np.allclose(torch_predict.sum(axis=1), 1.0, atol=1e-5)
    # A trained model: not the same answer for every image.
    assert len({int(row.argmax()) for row in torch_predict}) > 1

"""Start-up of `ctscan serve`: bad models, N workers, --help (SIGTERM: test_serve_torch.py).

A bad MODEL fails before the port is bound, with one line on stderr and no traceback.
`--workers 2` starts two processes that answer, and stopping the parent leaves none behind.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from typer.testing import CliRunner

from ctscan.cli import app
from tests.serve_helpers import (
    ServeModel,
    clean_env,
    live_server,
    png_bytes,
    sample_images,
    serve_command,
    serve_model_fixture,  # noqa: F401  (the session's model)
    toml_str,
)


def test_serve_help_shows_the_defaults() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    text = " ".join(result.output.replace("│", " ").split())
    for shown in (
        "(default: serve.host)",
        "(default: serve.port)",
        "(default: 1)",
        "(default: auto, ONNX Runtime when it can)",
    ):
        assert shown in text  # not eaten as Rich markup


def test_a_bad_model_fails_before_binding_with_one_line(tmp_path: Path) -> None:
    folder = tmp_path / "a-folder"
    folder.mkdir()
    garbage_pt = tmp_path / "garbage.pt"
    garbage_pt.write_bytes(b"not a checkpoint at all")
    garbage_onnx = tmp_path / "garbage.onnx"
    garbage_onnx.write_bytes(b"not an onnx model")
    cases = {
        str(tmp_path / "missing.pt"): "does not exist",
        str(folder): "is a folder",
        str(garbage_pt): "not a PyTorch checkpoint",
        str(garbage_onnx): "not a readable ONNX model",
        "models:/no-such-model@champion": "models:/no-such-model@champion",
    }
    overrides = {
        "paths.runs_dir": toml_str(tmp_path / "runs"),
        "tracking.uri": toml_str(f"sqlite:///{tmp_path / 'no-store' / 'mlflow.db'}"),
    }
    with socket.socket() as held:  # the port is taken: binding first would fail differently
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        procs = {
            model: subprocess.Popen(
                serve_command(model, port, overrides=overrides),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=clean_env(),
                cwd=tmp_path,
            )
            for model in cases
        }
        outputs = {model: proc.communicate(timeout=120) for model, proc in procs.items()}
    for model, words in cases.items():
        out, err = outputs[model]
        assert procs[model].returncode not in (0, None), (model, err)
        assert err.startswith("ctscan: error: ") and err.count("\n") == 1, (model, err)
        assert words in err and "Traceback" not in err, (model, err)
        assert "address already in use" not in err.lower() and out == "", (model, out)


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn", "prometheus_client", "python_multipart"])
def test_a_missing_serve_extra_is_one_line_naming_it(missing: str, tmp_path: Path) -> None:
    """Each of the serve extra's packages, as if not installed: one line naming it and the extra
    (fastapi, uvicorn and prometheus_client were tracebacks, python-multipart one after the model
    was opened)."""
    code = (
        f"import sys; sys.modules[{missing!r}] = None\n"  # import fails, find_spec gives None
        "from ctscan.cli import main\n"
        f"sys.argv = ['ctscan', 'serve', {str(tmp_path / 'none.onnx')!r}]\n"
        "main()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f"ctscan: error: ctscan serve needs {missing}, not "), proc.stderr
    assert "pip install 'ctscan[serve]'" in proc.stderr


def _workers(parent: psutil.Process) -> list[psutil.Process]:
    """uvicorn's worker processes under `parent` (multiprocessing spawns; not its tracker)."""
    found = []
    for child in parent.children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_two_workers_start_answer_and_stop_together(
    serve_model: ServeModel, tmp_path: Path
) -> None:
    with live_server(
        serve_model.onnx,
        runs_dir=serve_model.runs_dir,
        args=("--workers", "2"),
        log=tmp_path / "serve.log",
    ) as server:
        parent = psutil.Process(server.pid)
        deadline = time.monotonic() + 60
        while len(workers := _workers(parent)) < 2:
            assert time.monotonic() < deadline, "two worker processes did not appear"
            time.sleep(0.2)
        pngs = [png_bytes(img) for img in sample_images(8, seed=51)]
        with server.client() as client:
            for png in pngs:
                response = client.post("/predict", files={"file": ("a.png", png)})
                assert response.status_code == 200, response.text
        code = server.terminate()
    assert code == 0, server.output()[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, [p.pid for p in alive]

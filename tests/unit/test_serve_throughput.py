"""What keeps the server's CPU for the work under load: the decode pool, ONNX Runtime's options.

The load figure itself is a bench (bench/serve_load.py), never a timed assertion; these tests pin
the mechanisms it depends on, in process with the app's real lifespan and a real ONNX model.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient

from ctscan.inference.predictor import session_options
from ctscan.serve.app import create_app
from ctscan.serve.server import build_service
from ctscan.settings import load_settings
from tests.serve_helpers import (
    ServeModel,
    png_bytes,
    sample_images,
    serve_model_fixture,  # noqa: F401  (the session's model)
    toml_str,
)

SPIN_KEY = "session.intra_op.allow_spinning"


def _settings(serve_model: ServeModel, *overrides: str):
    return load_settings(
        overrides=[
            f"paths.runs_dir={toml_str(serve_model.runs_dir)}",
            f"paths.processed_dir={toml_str(serve_model.store)}",
            'serve.backend="onnx"',
            *overrides,
        ]
    )


@pytest.mark.parametrize("threads", [1, 3])
def test_uploads_are_decoded_on_the_decode_pool_of_the_configured_size(
    serve_model: ServeModel, threads: int
) -> None:
    settings = _settings(serve_model, f"inference.decode_threads={threads}")
    service = build_service(str(serve_model.onnx), settings)
    seen: list[str] = []
    read = service.predictor.read  # decode + resize of one upload, timed

    def recording_read(data: bytes, **options):
        seen.append(threading.current_thread().name)
        return read(data, **options)

    service.predictor.read = recording_read  # type: ignore[method-assign]
    images = [png_bytes(image) for image in sample_images(8)]
    with TestClient(create_app(service)) as client:
        assert service.decoder is not None
        assert service.decoder._max_workers == threads
        with ThreadPoolExecutor(8) as pool:
            replies = list(
                pool.map(
                    lambda data: client.post("/predict", files={"file": ("a.png", data)}),
                    images,
                )
            )
        assert [r.status_code for r in replies] == [200] * 8
        batch = client.post(
            "/predict/batch", files=[("files", (f"{i}.png", d)) for i, d in enumerate(images)]
        )
        assert batch.status_code == 200
    assert len(seen) == 16
    assert all(name.startswith("ctscan-decode") for name in seen), seen
    assert len(set(seen)) <= threads
    assert service.decoder._shutdown  # stopped with the app


def test_the_decode_pool_exists_only_while_the_app_runs(serve_model: ServeModel) -> None:
    service = build_service(str(serve_model.onnx), _settings(serve_model))
    with pytest.raises(RuntimeError, match="lifespan"):
        asyncio.run(service.read(b"", "x"))


def test_onnx_runtime_spin_waits_only_when_asked() -> None:
    off = session_options(load_settings())
    assert off.get_session_config_entry(SPIN_KEY) == "0"
    on = session_options(load_settings(overrides=["inference.onnx_spinning=true"]))
    with pytest.raises(RuntimeError, match=SPIN_KEY):  # not set: ONNX Runtime's default (spin)
        on.get_session_config_entry(SPIN_KEY)


def test_onnx_runtime_threads_follow_train_threads() -> None:
    assert session_options(load_settings(overrides=["train.threads=3"])).intra_op_num_threads == 3
    assert session_options(load_settings()).intra_op_num_threads == 0  # ORT's own default

"""The real server on the PyTorch backend, batching off, a queue of one request, token by --set.

`ctscan serve best.pt --backend torch --set serve.batching=false --set serve.queue_size=1`:
every model call holds one request's images; a burst of requests is partly refused with 503 and
Retry-After, never another 5xx; /explain answers a Grad-CAM PNG (for the predicted class or the
`target` one) while predictions run on the same PyTorch model; SIGTERM lets the request in
flight finish (200) and the process exits 0 within serve.shutdown_timeout_s. (The SIGTERM test
stops the module's server; a later test gets a fresh one.)
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from ctscan import CLASS_NAMES
from tests.serve_helpers import (
    LiveServer,
    RestartingServer,
    ServeModel,
    live_server,
    metric,
    metric_samples,
    png_bytes,
    sample_images,
    serve_model_fixture,  # noqa: F401  (the session's model)
    toml_str,
)

TOKEN = "set-token-for-torch"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHUTDOWN_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def torch_servers(
    serve_model: ServeModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RestartingServer]:
    """The checkpoint on torch, unbatched, with a queue of one and a token given by --set."""
    folder = tmp_path_factory.mktemp("torch-server")
    servers = RestartingServer(
        lambda: live_server(
            serve_model.checkpoint,
            runs_dir=serve_model.runs_dir,
            args=("--backend", "torch"),
            overrides={
                "serve.batching": "false",
                "serve.queue_size": "1",
                "serve.token": toml_str(TOKEN),
                "serve.shutdown_timeout_s": str(SHUTDOWN_TIMEOUT_S),
            },
            token=TOKEN,
            log=folder / f"serve-{time.monotonic_ns()}.log",
        )
    )
    yield servers
    servers.close()


@pytest.fixture
def torch_server(torch_servers: RestartingServer) -> LiveServer:
    """The running torch server."""
    return torch_servers.get()


def _batch_histogram(server: LiveServer) -> tuple[float, float, float]:
    """(model calls, images, calls of exactly one image) from /metrics."""
    with server.client() as client:
        samples = metric_samples(client.get("/metrics").text)
    return (
        metric(samples, "ctscan_batch_size_count"),
        metric(samples, "ctscan_batch_size_sum"),
        metric(samples, "ctscan_batch_size_bucket", le="1.0"),
    )


def test_the_token_from_set_guards_the_routes(torch_server: LiveServer) -> None:
    assert httpx.get(f"{torch_server.url}/metrics").status_code == 401
    wrong = torch_server.headers("not-" + TOKEN)
    assert httpx.get(f"{torch_server.url}/metrics", headers=wrong).status_code == 401
    with torch_server.client() as client:
        ready = client.get("/ready").json()
        assert ready["model"]["backend"] == "torch" and ready["model"]["format"] == "checkpoint"
        assert client.get("/metrics").status_code == 200


def test_without_batching_every_model_call_holds_one_image(torch_server: LiveServer) -> None:
    pngs = [png_bytes(img) for img in sample_images(12, seed=3)]
    calls0, images0, ones0 = _batch_histogram(torch_server)

    def predict(png: bytes) -> int:
        with torch_server.client() as client:
            return client.post("/predict", files={"file": ("a.png", png)}).status_code

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(predict, pngs))
    assert set(codes) <= {200, 503} and codes.count(200) >= 1
    calls, images, ones = _batch_histogram(torch_server)
    assert calls - calls0 == codes.count(200)  # one model call per answered request ...
    assert images - images0 == calls - calls0  # ... of one image each
    assert ones - ones0 == calls - calls0


def test_a_burst_on_a_tiny_queue_gets_503_with_retry_after_and_no_other_5xx(
    torch_server: LiveServer,
) -> None:
    pngs = [png_bytes(img) for img in sample_images(32, seed=4)]
    files = [("files", (f"{i}.png", png)) for i, png in enumerate(pngs)]

    def send(_: int) -> httpx.Response:
        with torch_server.client() as client:
            return client.post("/predict/batch", files=files)

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(send, range(48)))
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert 503 in codes and 200 in codes, codes
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"] == "1"
            body = response.json()
            assert "queue is full" in body["error"] and body["fix"]
        else:
            assert len(response.json()["predictions"]) == 32


def test_explain_answers_a_png_for_the_predicted_class(torch_server: LiveServer) -> None:
    png = png_bytes(sample_images(1, seed=6)[0])
    with torch_server.client() as client:
        predicted = client.post("/predict", files={"file": ("a.png", png)}).json()
        response = client.post("/explain", files={"file": ("a.png", png)})
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content.startswith(PNG_MAGIC)
    assert response.headers["X-Label"] == predicted["label"]
    assert float(response.headers["X-Confidence"]) == pytest.approx(
        predicted["confidence"], abs=1e-5
    )


def test_explain_target_picks_the_class(torch_server: LiveServer) -> None:
    png = png_bytes(sample_images(1, seed=6)[0])
    with torch_server.client() as client:
        predicted = client.post("/predict", files={"file": ("a.png", png)}).json()
        other = next(name for name in CLASS_NAMES if name != predicted["label"])
        response = client.post("/explain", files={"file": ("a.png", png)}, data={"target": other})
        assert response.status_code == 200
        assert response.headers["X-Label"] == other
        assert float(response.headers["X-Confidence"]) == pytest.approx(
            predicted["probabilities"][other], abs=1e-5
        )
        bad = client.post("/explain", files={"file": ("a.png", png)}, data={"target": "tumour"})
        described = client.get("/openapi.json").json()["paths"]["/explain"]["post"]["responses"]
    headers = described["200"]["headers"]  # the docs say the headers are the target's
    assert "target" in headers["X-Label"]["description"]
    assert "X-Label" in headers["X-Confidence"]["description"]
    assert bad.status_code == 422
    assert "tumour" in bad.json()["error"] and "normal" in bad.json()["fix"]


def test_grad_cam_and_predictions_share_the_torch_model_safely(torch_server: LiveServer) -> None:
    images = sample_images(8, seed=5)

    def post(route: str, image: np.ndarray) -> httpx.Response:
        with torch_server.client() as client:
            return client.post(route, files={"file": ("a.png", png_bytes(image))})

    with ThreadPoolExecutor(8) as pool:
        explained = [pool.submit(post, "/explain", img) for img in images]
        predicted = [pool.submit(post, "/predict", img) for img in images * 2]
        explain_codes = [f.result().status_code for f in explained]
        predict_codes = [f.result().status_code for f in predicted]
    assert explain_codes == [200] * len(images)
    assert set(predict_codes) <= {200, 503}
    assert all(f.result().content.startswith(PNG_MAGIC) for f in explained)


def _slow_batch(
    files: list[bytes], resume: threading.Event, started: threading.Event
) -> tuple[Iterator[bytes], dict[str, str]]:
    """A multipart body of `files` (field `files`) that stops half-way until `resume` is set."""
    boundary = uuid.uuid4().hex
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{i}.png"\r\n'
        f"Content-Type: image/png\r\n\r\n".encode()
        + data
        + b"\r\n"
        for i, data in enumerate(files)
    )
    body = parts + f"--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield body[: len(body) // 2]
        started.set()
        resume.wait(timeout=30)
        yield body[len(body) // 2 :]

    return chunks(), {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_sigterm_lets_the_request_in_flight_finish_and_exits_0(torch_server: LiveServer) -> None:
    server = torch_server
    files = [png_bytes(img) for img in sample_images(16, seed=41)]
    resume, started = threading.Event(), threading.Event()
    content, headers = _slow_batch(files, resume, started)
    answer: dict[str, object] = {}

    def send() -> None:
        try:
            with server.client(timeout=60) as client:
                answer["response"] = client.post("/predict/batch", content=content, headers=headers)
        except httpx.HTTPError as exc:  # reported by the assertions below
            answer["error"] = exc

    sender = threading.Thread(target=send)
    sender.start()
    assert started.wait(timeout=30)
    time.sleep(0.5)  # the first half is at the server: the request is in flight
    server.proc.send_signal(signal.SIGTERM)
    stopped_at = time.monotonic()
    refused = False  # the server is shutting down: it stops taking new connections
    while not refused and time.monotonic() - stopped_at < 10:
        try:
            httpx.get(f"{server.url}/health", timeout=2)
            time.sleep(0.1)
        except httpx.ConnectError:
            refused = True
    assert refused, "the server still took new connections 10 s after SIGTERM"
    resume.set()
    sender.join(timeout=60)
    code = server.proc.wait(timeout=SHUTDOWN_TIMEOUT_S + 30)
    elapsed = time.monotonic() - stopped_at
    assert "error" not in answer, answer.get("error")
    response = answer["response"]
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    rows = response.json()["predictions"]
    assert len(rows) == len(files) and all(r["error"] is None for r in rows)
    assert code == 0, server.output()[-3000:]
    assert elapsed < SHUTDOWN_TIMEOUT_S, elapsed
    assert "Traceback" not in server.output()

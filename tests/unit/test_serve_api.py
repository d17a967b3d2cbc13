"""The HTTP API of the real server: every route, every error code, token, metrics, KServe v2.

One server for the module: `ctscan serve best.onnx` (ONNX Runtime, no Grad-CAM) with batching
on, a small upload limit, at most 4 files a request, and a bearer token from the environment
(CTSCAN_SERVE__TOKEN). Inputs are 32 px PNGs like the training images. Besides the routes'
answers this checks that bad input is never a 500 nor a stack trace (Hypothesis over generated
bytes and images), that the OpenAPI schema documents every status, media type and header the
server answers with (schemathesis), that the Open Inference Protocol works with the real
`tritonclient.http` client and gives /predict's probabilities, and that concurrent requests
are gathered into model calls of several images, each caller getting its own answer.
"""

from __future__ import annotations

import base64
import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ctscan import CLASS_NAMES
from ctscan.files import file_sha256
from ctscan.inference import open_predictor
from ctscan.serve.app import STATIC
from ctscan.serve.metrics import STAGES, WALL_ONLY
from ctscan.settings import load_settings
from tests.conftest import png_header_only
from tests.serve_helpers import (
    HEALTH_ROUTES,
    LiveServer,
    ServeModel,
    clean_env,
    live_server,
    metric,
    metric_samples,
    noise_png,
    png_bytes,
    sample_images,
    serve_model_fixture,  # noqa: F401  (the session's model)
)

TOKEN = "env-token-for-the-api"
MAX_UPLOAD = 20_000  # serve.max_upload_bytes
MAX_FILES = 4  # serve.max_batch_files
BODY_LIMIT = MAX_UPLOAD + 64 * 1024  # what the body-size middleware lets through on /predict
MODEL_NAME = "ctscan"
RAW = {"content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def server(
    serve_model: ServeModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LiveServer]:
    """The ONNX file served with batching on and a token from the environment."""
    with live_server(
        serve_model.onnx,
        runs_dir=serve_model.runs_dir,
        env={"CTSCAN_SERVE__TOKEN": TOKEN},
        overrides={
            "serve.max_upload_bytes": str(MAX_UPLOAD),
            "serve.max_batch_files": str(MAX_FILES),
            "serve.max_wait_ms": "20",
        },
        token=TOKEN,
        log=tmp_path_factory.mktemp("api-server") / "serve.log",
    ) as live:
        yield live


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    """An httpx client with the token."""
    with server.client() as c:
        yield c


@pytest.fixture(scope="module")
def local_onnx(serve_model: ServeModel):
    """The same ONNX file opened in this process: the reference answers."""
    return open_predictor(serve_model.onnx, settings=load_settings([], []))


def _assert_json_error(response: httpx.Response, status: int, *words: str) -> dict:
    """The response is `status` with a JSON {"error", "fix"} body naming `words`, no trace."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert set(body) == {"error", "fix"} and isinstance(body["error"], str)
    for word in words:
        assert word in body["error"], body
    return body


def _predict(client: httpx.Client, data: bytes, name: str = "a.png") -> httpx.Response:
    return client.post("/predict", files={"file": (name, data)})


# ---- health, predictions -----------------------------------------------------------------


def test_health_routes_answer_without_a_token(server: LiveServer) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["status"] == "ready"
    assert ready["model"]["name"] == "cnn_gap" and ready["model"]["backend"] == "onnx"
    for route in HEALTH_ROUTES:
        assert httpx.get(f"{server.url}{route}").status_code == 200, route


def test_predict_answers_the_models_probabilities(
    client: httpx.Client, local_onnx, serve_model: ServeModel
) -> None:
    image = sample_images(1, seed=1)[0]
    response = _predict(client, png_bytes(image))
    assert response.status_code == 200
    body = response.json()
    probs = body["probabilities"]
    assert list(probs) == list(CLASS_NAMES)
    assert sum(probs.values()) == pytest.approx(1.0, abs=1e-5)
    assert body["label"] == max(probs, key=probs.get) == CLASS_NAMES[body["class_index"]]
    assert body["confidence"] == probs[body["label"]]
    expected = local_onnx.probabilities(image[None, None])[0]
    assert np.abs(np.array(list(probs.values())) - expected).max() <= 1e-5
    model = body["model"]
    assert model["name"] == "cnn_gap" and model["format"] == "onnx"
    assert model["sha256"] == file_sha256(serve_model.checkpoint)  # the weights' checkpoint
    assert body["latency_ms"] > 0


@pytest.mark.parametrize(
    ("fmt", "mode"), [("JPEG", "L"), ("BMP", "RGB"), ("TIFF", "L"), ("WEBP", "RGB"), ("PNG", "LA")]
)
def test_predict_reads_every_format(client: httpx.Client, fmt: str, mode: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(sample_images(1, size=48, seed=2)[0]).convert(mode).save(buf, fmt)
    response = _predict(client, buf.getvalue(), f"a.{fmt.lower()}")
    assert response.status_code == 200, response.text
    assert response.json()["label"] in CLASS_NAMES


@pytest.mark.parametrize("kind", ["image/png", "image/jpeg", "application/octet-stream"])
def test_predict_takes_the_image_as_the_body(client: httpx.Client, kind: str) -> None:
    png = png_bytes(sample_images(1, seed=5)[0])
    multipart = _predict(client, png).json()
    raw = client.post("/predict", content=png, headers={"content-type": kind})
    assert raw.status_code == 200, raw.text  # the format is read from the bytes, not the type
    assert raw.json()["probabilities"] == multipart["probabilities"]
    assert raw.json()["model"] == multipart["model"]


def test_predict_raw_body_errors(client: httpx.Client) -> None:
    png = png_bytes(sample_images(1)[0])
    text = client.post("/predict", content=png, headers={"content-type": "text/plain"})
    fix = _assert_json_error(text, 415, "text/plain")["fix"]
    assert all(kind in fix for kind in ("multipart/form-data", "image/png", "application/dicom"))
    half = png[: len(png) // 2]
    broken = client.post("/predict", content=half, headers={"content-type": "image/png"})
    _assert_json_error(broken, 422, "the upload", "truncated or corrupt")
    big = client.post("/predict", content=noise_png(MAX_UPLOAD + 500), headers=RAW)
    _assert_json_error(big, 413, str(MAX_UPLOAD))


def _chunked_multipart(data: bytes) -> tuple[Iterator[bytes], dict[str, str]]:
    """A multipart body with `data` in field `file`, sent in chunks (no Content-Length)."""
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))
    return chunks, {"content-type": f"multipart/form-data; boundary={boundary}"}


def test_predict_413_for_a_file_over_max_upload_bytes(client: httpx.Client) -> None:
    body = _assert_json_error(_predict(client, noise_png(MAX_UPLOAD + 500)), 413, str(MAX_UPLOAD))
    assert "serve.max_upload_bytes" in body["fix"]


def test_predict_413_for_a_body_over_the_limit_declared_or_streamed(client: httpx.Client) -> None:
    big = noise_png(BODY_LIMIT + 10_000)
    # the byte count matches no setting, so the message says which settings make it
    reason = f"serve.max_upload_bytes = {MAX_UPLOAD}, plus 64 KiB"
    declared = _assert_json_error(_predict(client, big), 413, reason)  # refused on Content-Length
    assert "serve.max_batch_files" in declared["fix"]
    chunks, headers = _chunked_multipart(big)
    streamed = client.post("/predict", content=chunks, headers=headers)
    assert _assert_json_error(streamed, 413, reason)["fix"] == declared["fix"]


def test_predict_415_for_text(client: httpx.Client) -> None:
    body = _assert_json_error(_predict(client, b"just some text\n", "notes.txt"), 415, "notes.txt")
    assert "PNG" in body["error"]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("corrupt_png", ["truncated or corrupt"]),
        ("empty_file", ["empty"]),
        ("too_many_pixels", ["20000x20000"]),
        ("wrong_field", ["file", "Field required"]),
        ("no_body", ["file"]),
    ],
)
def test_predict_422(client: httpx.Client, case: str, words: list[str]) -> None:
    good = png_bytes(sample_images(1)[0])
    if case == "corrupt_png":
        response = _predict(client, good[: len(good) // 2])
    elif case == "empty_file":
        response = _predict(client, b"")
    elif case == "too_many_pixels":
        response = _predict(client, png_header_only(20_000, 20_000))
    elif case == "wrong_field":
        response = client.post("/predict", files={"image": ("a.png", good)})
    else:
        response = client.post("/predict")
    body = _assert_json_error(response, 422, *words)
    if case == "corrupt_png":  # a fix an HTTP client can apply, not the CLI's `dvc pull`
        assert "send the whole file" in body["fix"] and "dvc" not in body["fix"]


def test_predict_400_for_a_malformed_multipart_body(client: httpx.Client) -> None:
    response = client.post(
        "/predict",
        content=b"--xyz\r\nthis is not a part\r\n--xyz--\r\n",
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    body = _assert_json_error(response, 400, "cannot be read")
    assert "file" in body["fix"]


def test_predict_batch_answers_each_file_in_order(client: httpx.Client, local_onnx) -> None:
    images = sample_images(3, seed=7)
    good = [png_bytes(img) for img in images]
    files = [
        ("files", ("a.png", good[0])),
        ("files", ("broken.png", good[1][: len(good[1]) // 2])),
        ("files", ("text.png", b"hello")),
        ("files", ("c.png", good[2])),
    ]
    response = client.post("/predict/batch", files=files)
    assert response.status_code == 200
    rows = response.json()["predictions"]
    assert [r["filename"] for r in rows] == ["a.png", "broken.png", "text.png", "c.png"]
    assert rows[1]["label"] is None and "truncated or corrupt" in rows[1]["error"]
    assert rows[2]["label"] is None and "not a PNG" in rows[2]["error"]
    expected = local_onnx.probabilities(np.stack([images[0], images[2]])[:, None])
    for row, want in zip([rows[0], rows[3]], expected, strict=True):
        assert row["error"] is None
        assert np.abs(np.array(list(row["probabilities"].values())) - want).max() <= 1e-5


def test_predict_batch_413_for_too_many_files(client: httpx.Client) -> None:
    png = png_bytes(sample_images(1)[0])
    files = [("files", (f"{i}.png", png)) for i in range(MAX_FILES + 1)]
    body = _assert_json_error(client.post("/predict/batch", files=files), 413, str(MAX_FILES))
    assert "serve.max_batch_files" in body["fix"]


def test_predict_batch_413_names_the_batch_body_limit(client: httpx.Client) -> None:
    big = noise_png(MAX_UPLOAD * MAX_FILES + 64 * 1024 + 10_000)
    response = client.post("/predict/batch", files=[("files", ("big.png", big))])
    reason = f"serve.max_upload_bytes = {MAX_UPLOAD} x serve.max_batch_files = {MAX_FILES}"
    _assert_json_error(response, 413, reason, str(MAX_UPLOAD * MAX_FILES + 64 * 1024))


def test_explain_is_501_on_an_onnx_only_server(client: httpx.Client) -> None:
    png = png_bytes(sample_images(1)[0])
    body = _assert_json_error(client.post("/explain", files={"file": ("a.png", png)}), 501)
    assert "Grad-CAM" in body["error"] and ".pt" in body["fix"]


# ---- metrics, drift, docs, the page ----------------------------------------------------------


def test_metrics_count_requests_latency_predictions_batches_and_the_model(
    client: httpx.Client,
) -> None:
    before = metric_samples(client.get("/metrics").text)
    pngs = [png_bytes(img) for img in sample_images(3, seed=11)]
    for png in pngs:
        assert _predict(client, png).status_code == 200
    assert _predict(client, b"text").status_code == 415
    assert _predict(client, noise_png(BODY_LIMIT + 1000)).status_code == 413  # before routing
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    after = metric_samples(response.text)

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("ctscan_requests_total", route="/predict", status="200") == 3
    assert delta("ctscan_requests_total", route="/predict", status="415") == 1
    assert delta("ctscan_requests_total", route="/predict", status="413") == 1  # counted once,
    assert delta("ctscan_requests_total", route="unmatched", status="413") == 0  # under its route
    assert delta("ctscan_request_latency_seconds_count", route="/predict") == 5
    assert sum(delta("ctscan_predictions_total", label=name) for name in CLASS_NAMES) == 3
    assert delta("ctscan_prediction_confidence_count") == 3
    assert delta("ctscan_batch_size_count") >= 1 and delta("ctscan_batch_size_sum") == 3
    for stage in STAGES:  # the time budget: each stage of the 3 answers (the 415 stops early)
        for clock in ("wall",) if stage in WALL_ONLY else ("wall", "cpu"):
            seen = 4 if stage in ("bytes_in", "multipart") else 3
            assert delta("ctscan_stage_seconds_count", stage=stage, clock=clock) == seen, stage
            assert delta("ctscan_stage_seconds_sum", stage=stage, clock=clock) >= 0, stage
    model_cpu = delta("ctscan_stage_seconds_sum", stage="model", clock="cpu")
    model_wall = delta("ctscan_stage_seconds_sum", stage="model", clock="wall")
    assert 0 < model_cpu <= (os.cpu_count() or 1) * model_wall + 0.01
    info = {
        dict(lab)["backend"]: value
        for (name, lab), value in after.items()
        if name == "ctscan_model_info"
    }
    assert info == {"onnx": 1.0}
    model_labels = next(dict(lab) for (name, lab) in after if name == "ctscan_model_info")
    assert model_labels["name"] == "cnn_gap" and model_labels["format"] == "onnx"


def test_drift_answers_unavailable_without_a_reference(client: httpx.Client) -> None:
    response = client.get("/monitoring/drift")
    assert response.status_code == 200
    body = response.json()
    assert body["available"] is False and body["reason"]


def test_docs_and_openapi_are_served(server: LiveServer) -> None:
    docs = httpx.get(f"{server.url}/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = httpx.get(f"{server.url}/openapi.json").json()
    expected = {
        "/health",
        "/ready",
        "/predict",
        "/predict/batch",
        "/explain",
        "/metrics",
        "/monitoring/drift",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/ready",
        "/v2/models/{model_name}/infer",
    }
    assert expected <= set(schema["paths"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "HTTPValidationError" not in schema["components"]["schemas"]  # errors are ours


def test_the_web_page_is_served_without_a_token(server: LiveServer) -> None:
    if not (STATIC / "index.html").is_file():
        pytest.skip("no web page in this tree (src/ctscan/serve/static/index.html)")
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")


# ---- the token --------------------------------------------------------------------------------


def _operations(server: LiveServer) -> list[tuple[str, str, list[str]]]:
    """(method, concrete path, tags) of every operation in the OpenAPI schema."""
    schema = httpx.get(f"{server.url}/openapi.json").json()
    out = []
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            out.append((method.upper(), path.replace("{model_name}", MODEL_NAME), operation))
    return out


def test_every_route_but_the_health_ones_needs_the_token(server: LiveServer) -> None:
    operations = _operations(server)
    guarded = [(m, p) for m, p, op in operations if p not in HEALTH_ROUTES]
    assert len(guarded) == 8
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        for method, path in guarded:
            for headers in ({}, server.headers("wrong"), {"Authorization": TOKEN}):
                response = anonymous.request(method, path, headers=headers)
                _assert_json_error(response, 401, "token")
                assert response.headers["WWW-Authenticate"] == "Bearer"
            allowed = anonymous.request(method, path, headers=server.headers())
            # 400/422: no body sent; 501: no Grad-CAM on this ONNX-only server
            assert allowed.status_code in (200, 400, 422, 501), (method, path, allowed.text)
        for method, path, operation in operations:
            if path in HEALTH_ROUTES:
                assert anonymous.request(method, path).status_code == 200, path
                assert "security" not in operation, path
            else:
                assert operation["security"] == [{"HTTPBearer": []}], path
                assert "401" in operation["responses"], path


# ---- the Open Inference Protocol with tritonclient ---------------------------------------------


@pytest.fixture(scope="module")
def triton(server: LiveServer):
    """The real KServe v2 / Triton HTTP client on the server."""
    triton_http = pytest.importorskip(
        "tritonclient.http", reason="pip install 'tritonclient[http]'"
    )
    client = triton_http.InferenceServerClient(url=server.url.removeprefix("http://"))
    yield client
    client.close()


def test_kserve_health_metadata_and_readiness(triton, server: LiveServer) -> None:
    from tritonclient.utils import InferenceServerException

    assert triton.is_server_live() and triton.is_server_ready()
    assert triton.is_model_ready(MODEL_NAME, headers=server.headers())
    assert not triton.is_model_ready(MODEL_NAME)  # 401 without the token
    meta = triton.get_model_metadata(MODEL_NAME, headers=server.headers())
    assert meta["name"] == MODEL_NAME
    assert {i["name"]: (i["datatype"], i["shape"]) for i in meta["inputs"]} == {
        "image": ("UINT8", [-1, 1, 32, 32]),
        "image_bytes": ("BYTES", [-1]),
    }
    assert meta["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 4]}]
    assert meta["parameters"]["class_names"] == list(CLASS_NAMES)
    with pytest.raises(InferenceServerException, match="404"):
        triton.get_model_metadata("other-model", headers=server.headers())


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("input_name", ["image", "image_bytes"])
def test_kserve_infer_matches_predict(
    triton, server: LiveServer, client: httpx.Client, input_name: str, binary: bool
) -> None:
    import tritonclient.http as triton_http

    images = sample_images(3, seed=21)
    pngs = [png_bytes(img) for img in images]
    if input_name == "image":
        tensor = np.stack(images)[:, None]  # (3, 1, 32, 32) uint8
        infer_input = triton_http.InferInput("image", list(tensor.shape), "UINT8")
        infer_input.set_data_from_numpy(tensor, binary_data=binary)
    else:
        # The binary extension carries the files raw; plain JSON carries base64 strings.
        elements = pngs if binary else [base64.b64encode(p).decode() for p in pngs]
        infer_input = triton_http.InferInput("image_bytes", [3], "BYTES")
        infer_input.set_data_from_numpy(np.array(elements, dtype=np.object_), binary_data=binary)
    output = triton_http.InferRequestedOutput("probabilities", binary_data=binary)
    result = triton.infer(
        MODEL_NAME, [infer_input], outputs=[output], headers=server.headers(), request_id="r1"
    )
    got = result.as_numpy("probabilities")
    assert got.shape == (3, 4) and got.dtype == np.float32
    assert result.get_response()["id"] == "r1"
    for row, png in zip(got, pngs, strict=True):
        answer = _predict(client, png).json()["probabilities"]
        assert np.abs(row - np.array(list(answer.values()))).max() <= 1e-5
    # No output named: tritonclient asks for every output in binary (binary_data_output).
    result = triton.infer(MODEL_NAME, [infer_input], headers=server.headers())
    assert np.abs(result.as_numpy("probabilities") - got).max() <= 1e-6


def test_kserve_takes_base64_files_up_to_max_upload_bytes(client: httpx.Client) -> None:
    # JSON carries files as base64 (4 bytes for 3): the body limit allows for it
    png = noise_png(17_000)
    assert len(png) <= MAX_UPLOAD
    text = base64.b64encode(png).decode()
    request = {
        "inputs": [
            {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [MAX_FILES],
                "data": [text] * MAX_FILES,
            }
        ]
    }
    infer = f"/v2/models/{MODEL_NAME}/infer"
    assert client.post(infer, json=request).status_code == 200
    request["inputs"][0]["data"] = [
        base64.b64encode(noise_png(MAX_UPLOAD * 2)).decode()
    ] * MAX_FILES
    request["inputs"][0]["shape"] = [MAX_FILES]
    _assert_json_error(client.post(infer, json=request), 413, "x 4/3 for base64")
    request["inputs"][0]["data"] = [text] * (MAX_FILES + 1)
    request["inputs"][0]["shape"] = [MAX_FILES + 1]
    body = _assert_json_error(client.post(infer, json=request), 413, f"limit is {MAX_FILES}")
    assert "serve.max_batch_files" in body["fix"]


def test_kserve_errors_are_json_with_their_status(client: httpx.Client) -> None:
    infer = f"/v2/models/{MODEL_NAME}/infer"
    _assert_json_error(client.post(infer, content=b"{not json"), 400, "not valid JSON")
    wrong_shape = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8]}]}
    _assert_json_error(client.post(infer, json=wrong_shape), 400, "[B, 1, 32, 32]")
    not_image = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1]}]}
    not_image["inputs"][0]["data"] = [base64.b64encode(b"plain text").decode()]
    _assert_json_error(client.post(infer, json=not_image), 415)
    too_many = {
        "inputs": [
            {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [MAX_FILES + 1],
                "data": ["AA=="] * (MAX_FILES + 1),
            }
        ]
    }
    _assert_json_error(client.post(infer, json=too_many), 413)
    _assert_json_error(client.post("/v2/models/other/infer", json=wrong_shape), 404, "other")


# ---- batching ---------------------------------------------------------------------------------


def test_concurrent_requests_share_model_calls_and_get_their_own_answers(
    server: LiveServer, client: httpx.Client, local_onnx
) -> None:
    images = sample_images(16, seed=31)
    before = metric_samples(client.get("/metrics").text)

    def predict(image: np.ndarray) -> dict:
        with server.client() as own:
            response = _predict(own, png_bytes(image))
        assert response.status_code == 200
        return response.json()["probabilities"]

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(predict, images))
    after = metric_samples(client.get("/metrics").text)
    calls = metric(after, "ctscan_batch_size_count") - metric(before, "ctscan_batch_size_count")
    images_run = metric(after, "ctscan_batch_size_sum") - metric(before, "ctscan_batch_size_sum")
    assert images_run == 16
    assert calls < 16  # some model call held several requests' images
    expected = local_onnx.probabilities(np.stack(images)[:, None])
    for answer, want in zip(answers, expected, strict=True):  # each caller got its own rows
        assert np.abs(np.array(list(answer.values())) - want).max() <= 1e-5


# ---- never a 500 ----------------------------------------------------------------------------


def _encoded(image: np.ndarray, fmt: str, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert(mode).save(buf, fmt)
    return buf.getvalue()


# (format, mode) pairs Pillow writes
_KINDS = [
    ("PNG", "L"),
    ("PNG", "P"),
    ("PNG", "1"),
    ("JPEG", "L"),
    ("JPEG", "RGB"),
    ("BMP", "L"),
    ("BMP", "RGB"),
    ("TIFF", "RGB"),
    ("TIFF", "1"),
    ("WEBP", "RGB"),
]
_GOOD = [_encoded(sample_images(1, size=24)[0], fmt, mode) for fmt, mode in _KINDS]
_HEADS = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"\x00" * 128 + b"DICM",
]


@st.composite
def payloads(draw: st.DrawFn) -> bytes:
    """Bytes a client might upload: noise, a format's magic + noise, cut or damaged files,
    headers that claim huge sizes, small valid images of every format."""
    kind = draw(st.sampled_from(["noise", "magic", "cut", "flip", "huge", "image"]))
    if kind == "noise":
        return draw(st.binary(max_size=600))
    if kind == "magic":
        return draw(st.sampled_from(_HEADS)) + draw(st.binary(max_size=600))
    good = _GOOD[draw(st.integers(0, len(_GOOD) - 1))]
    if kind == "cut":
        return good[: draw(st.integers(0, len(good) - 1))]
    if kind == "flip":
        at = draw(st.integers(0, len(good) - 1))
        return good[:at] + bytes([draw(st.integers(0, 255))]) + good[at + 1 :]
    if kind == "huge":
        return png_header_only(draw(st.integers(1, 2**31 - 1)), draw(st.integers(1, 2**31 - 1)))
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    return _encoded(pixels, *draw(st.sampled_from(_KINDS)))


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=payloads())
def test_generated_uploads_never_get_a_500_nor_a_trace(client: httpx.Client, data: bytes) -> None:
    response = _predict(client, data, "upload.bin")
    assert response.status_code < 500, response.text
    assert "Traceback" not in response.text
    if response.status_code == 200:
        assert sum(response.json()["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    else:
        assert response.status_code in (413, 415, 422), response.text
        assert isinstance(response.json()["error"], str)


def test_schemathesis_finds_no_server_error_nor_undocumented_answer(
    server: LiveServer, tmp_path: Path
) -> None:
    """The OpenAPI schema documents every status, media type, header and body the API sends."""
    pytest.importorskip("schemathesis", reason="pip install schemathesis")
    checks = [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "ignored_auth",
    ]
    config = tmp_path / "schemathesis.toml"
    # The two documented 5xx answers: 501 /explain on an ONNX-only model, 503 a full queue.
    config.write_text(
        '[checks.not_a_server_error]\nexpected-statuses = ["2xx", "3xx", "4xx", "501", "503"]\n'
    )
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "run",
        f"{server.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        ",".join(checks),
        "--max-time",
        "20",
        "--workers",
        "1",
        "--request-timeout",
        "20",
        "--suppress-health-check",
        "all",
        "--no-color",
    ]
    proc = subprocess.run(
        command, capture_output=True, text=True, env=clean_env(), cwd=tmp_path, timeout=180
    )
    report = proc.stdout
    start = report.find("FAILURES")
    failures = report[start : report.find("WARNINGS", start)] if start >= 0 else report
    assert proc.returncode == 0, failures[-8000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout
    assert "Traceback" not in server.output()  # nothing went to the 500 handler

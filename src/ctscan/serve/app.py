"""The HTTP service: FastAPI routes over the one Predictor, dynamic batching, metrics, a web page.

Every error is JSON `{"error": ..., "fix": ...}`, a 4xx for bad input (`_ERROR_TEXT`), 500 only
for a bug (trace in the log). With `serve.token` every route but health, the page and the docs
needs `Authorization: Bearer`. No filesystem path comes from a request.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, Security, UploadFile
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile as StarletteUpload
from starlette.exceptions import HTTPException as StarletteHTTPException

from ctscan.errors import DataError
from ctscan.inference.predictor import Prediction, Predictor
from ctscan.serve import kserve, limits
from ctscan.serve.batching import Batcher, QueueFull
from ctscan.serve.limits import BodyLimit, sniff_format
from ctscan.serve.metrics import RequestTiming, model_cpu_clock

log = logging.getLogger("ctscan.serve")
STATIC = Path(__file__).parent / "static"
RETRY_AFTER_S = "1"
# At module level: FastAPI resolves the routes' string annotations in this module's globals.
BearerCredentials = Annotated[
    HTTPAuthorizationCredentials | None,
    Security(HTTPBearer(auto_error=False, description="serve.token")),
]
ModelName = Annotated[str, PathParam(description="serve.model_name (default: ctscan)")]


class ModelIdentity(BaseModel):
    """Which model answered."""

    name: str = Field(description="registry model name, e.g. efficientnet_lite0")
    version: str = Field(description="MLflow model version or the ctscan version that wrote it")
    sha256: str = Field(description="sha256 of the checkpoint the weights come from")
    backend: str = Field(description="torch, onnx (ONNX Runtime) or openvino")
    format: str = Field(description="checkpoint, onnx, onnx-int8 or mlflow")
    precision: str = Field(
        description="what the runtime computes in: fp32, bf16 or fp16 (onnx-int8: its float parts)"
    )
    temperature: float = Field(
        description="calibration temperature T: probabilities are softmax(logits / T); "
        "1.0 when uncalibrated"
    )
    calibration: str = Field(
        description="what T is: 'T = 1.31 (valid, 72 images)', or 'uncalibrated'"
    )


class PredictResponse(BaseModel):
    """The answer for one image."""

    label: str
    class_index: int
    confidence: float = Field(description="probability of the predicted class")
    probabilities: dict[str, float] = Field(description="class name -> probability")
    model: ModelIdentity
    latency_ms: float = Field(description="server time from upload read to answer")


class BatchItem(BaseModel):
    """One file of a batch: a prediction, or the reason it failed."""

    filename: str | None
    label: str | None = None
    class_index: int | None = None
    confidence: float | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None


class BatchResponse(BaseModel):
    """The answers for a batch of files, in the order sent."""

    predictions: list[BatchItem]
    model: ModelIdentity
    latency_ms: float


class ErrorResponse(BaseModel):
    """Every error: what is wrong and how to fix it."""

    error: str
    fix: str | None = None


_ERROR_TEXT = {
    400: "the body cannot be read: malformed multipart form, or an Open Inference Protocol "
    "request that does not fit the model",
    401: "missing or wrong bearer token (serve.token)",
    404: "no such model",
    413: "upload larger than serve.max_upload_bytes, or too many files",
    415: "not a PNG, JPEG, BMP, TIFF, WebP or DICOM file, or a Content-Type the route does not "
    "take",
    422: "the request does not fit the route: unreadable image, too many pixels, or a missing "
    "or wrong field",
    501: "this model cannot do that (Grad-CAM needs the PyTorch model)",
    503: "the request queue is full, the model is loading or the server is stopping: retry "
    "after the Retry-After seconds",
}


def _header(text: str) -> dict[str, Any]:
    return {"description": text, "schema": {"type": "string"}}


_ERROR_HEADERS = {
    401: {"headers": {"WWW-Authenticate": _header("Bearer")}},
    503: {"headers": {"Retry-After": _header("seconds to wait")}},
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for error codes: the JSON ErrorResponse, its meaning, its headers."""
    return {
        code: {"model": ErrorResponse, "description": _ERROR_TEXT[code]}
        | _ERROR_HEADERS.get(code, {})
        for code in codes
    }


class ApiError(Exception):
    """An error answered as JSON with its status code."""

    def __init__(self, status: int, error: str, fix: str | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.fix = status, error, fix


@dataclass
class Service:
    """What the routes share: the predictor, the batcher, metrics, the drift monitor."""

    predictor: Predictor
    settings: Any
    explainer: Predictor | None  # a torch predictor for Grad-CAM (None: ONNX only)
    metrics: Any  # serve.metrics.Metrics
    monitor: Any = None  # serve.monitoring.DriftMonitor or None
    batcher: Batcher | None = None
    ready: bool = False
    explain_lock: threading.Lock = field(default_factory=threading.Lock)
    decoder: ThreadPoolExecutor | None = None  # set while the app runs (lifespan)
    drift_off: str = "no training reference was found"  # why `monitor` is None

    async def read(self, data: bytes, name: str) -> np.ndarray:
        """Decode an upload on the decode threads (as many as the cores, not the loop's 40)."""
        if self.decoder is None:
            raise RuntimeError("the decode pool runs only while the app does (lifespan)")
        read = functools.partial(self.predictor.read, data, name=name, stage=self.metrics.stage)
        return await asyncio.get_running_loop().run_in_executor(self.decoder, read)

    @functools.cached_property
    def identity_json(self) -> str:
        return self.identity().model_dump_json()

    def answer(self, prediction: Prediction, start: float) -> bytes:
        """The /predict JSON, built once here (the model's part once per server)."""
        head = json.dumps(_answer_fields(prediction), separators=(",", ":"))
        latency_ms = (time.perf_counter() - start) * 1000
        return f'{head[:-1]},"model":{self.identity_json},"latency_ms":{latency_ms:.3f}}}'.encode()

    def identity(self) -> ModelIdentity:
        return ModelIdentity.model_validate(self.predictor.info.to_dict())  # less its source


async def get_service(request: Request) -> Service:
    """The one Service of this app (a dependency; async: no thread hop for an attribute)."""
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(get_service)]


async def served_model(model_name: ModelName, service: ServiceDep) -> str:
    """The `{model_name}` of an Open Inference Protocol path: 404 unless it is the served one."""
    name = service.settings.serve.model_name
    if model_name != name:
        raise ApiError(404, f"no model '{model_name}' here.", f"this server serves '{name}'.")
    return name


ServedModel = Annotated[str, Depends(served_model)]

# Routes in four routers; create_app adds the token check to `guarded` and `v2_models`.
health_routes = APIRouter(tags=["health"])
guarded = APIRouter()
v2_health = APIRouter(prefix="/v2/health", tags=["kserve-v2"])
v2_models = APIRouter(prefix="/v2/models/{model_name}", tags=["kserve-v2"])
ROUTERS = (health_routes, guarded, v2_health, v2_models)
EMPTY_OK = {200: {"description": "yes (empty body)"}}


@health_routes.get("/health")
async def health() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@health_routes.get("/ready", responses=_errors(503))
async def ready(service: ServiceDep) -> Any:
    """The model is loaded and warmed up; `input`: the size and resize policy it takes."""
    _require_ready(service)
    size, policy = service.predictor.spec.image_size, service.predictor.spec.resize
    model = service.identity().model_dump()
    return {"status": "ready", "model": model, "input": {"image_size": size, "resize": policy}}


RAW_TYPES = ("image/png", "image/jpeg", "application/dicom", "application/octet-stream")  # bodies
BINARY = {"type": "string", "format": "binary"}
_BINARY = {**BINARY, "description": "PNG/JPEG/DICOM"}
_FORM = {"type": "object", "required": ["file"], "properties": {"file": _BINARY}}
PREDICT_BODY = {
    "required": True,
    "description": "the image in the multipart field `file`, or the image itself as the body "
    "(its format is read from its bytes)",
    "content": {"multipart/form-data": {"schema": _FORM}}
    | {k: {"schema": _BINARY} for k in RAW_TYPES},
}


@guarded.post(
    "/predict",
    response_model=PredictResponse,
    tags=["predict"],
    responses=_errors(400, 401, 413, 415, 422, 503),
    openapi_extra={"requestBody": PREDICT_BODY},
)
async def predict(request: Request, service: ServiceDep) -> Response:
    """Predict the class of one CT slice."""
    start = time.perf_counter()
    image = await _decode(service, *await _upload(request, service))
    probs = await _submit(service, image[None, None])
    prediction = service.predictor.predictions(probs, [None])[0]
    with service.metrics.stage("monitor"):
        _record(service, image, prediction)
    with service.metrics.stage("json_out"):
        body = service.answer(prediction, start)
    return Response(body, media_type="application/json")


@guarded.post(
    "/predict/batch",
    response_model=BatchResponse,
    tags=["predict"],
    responses=_errors(400, 401, 413, 422, 503),
)
async def predict_batch(
    files: Annotated[list[UploadFile], File(description="several PNG/JPEG/DICOM files")],
    service: ServiceDep,
) -> Any:
    """Predict several files in one request; a file that cannot be read gets its own error."""
    start = time.perf_counter()
    _check_count(len(files), "files in one request", service)
    items = [BatchItem(filename=upload.filename) for upload in files]
    images: dict[int, np.ndarray] = {}  # item -> its decoded image
    for slot, upload in enumerate(files):
        try:
            images[slot] = await _decode(service, *await _file(upload))
        except ApiError as exc:
            items[slot].error = exc.error
    if images:
        probs = await _submit(service, np.stack(list(images.values()))[:, None])
        predictions = service.predictor.predictions(probs, [None] * len(images))
        for (slot, image), prediction in zip(images.items(), predictions, strict=True):
            _record(service, image, prediction)
            items[slot] = BatchItem(filename=items[slot].filename, **_answer_fields(prediction))
    return BatchResponse(
        predictions=items, model=service.identity(), latency_ms=(time.perf_counter() - start) * 1000
    )


@guarded.post(
    "/explain",
    tags=["predict"],
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {"schema": BINARY}},
            "description": "Grad-CAM overlay PNG of the class explained: `target` when sent, "
            "else the predicted class",
            "headers": {
                "X-Label": _header(
                    "the class explained: `target` when sent (then not necessarily the "
                    "prediction: POST /predict gives that), else the predicted class"
                ),
                "X-Confidence": _header("the probability of the X-Label class"),
            },
        },
        **_errors(400, 401, 413, 415, 422, 501),
    },
)
async def explain(
    file: Annotated[UploadFile, File(description="PNG/JPEG/DICOM")],
    service: ServiceDep,
    target: Annotated[
        str | None, Form(description="class to explain (default: the predicted one)")
    ] = None,
) -> Response:
    """The Grad-CAM overlay (PNG) for the predicted class, or for `target`."""
    explainer = service.explainer
    if explainer is None or explainer.torch_model is None:
        raise ApiError(
            501,
            "Grad-CAM needs the layers of the PyTorch model; this server runs an ONNX file or a "
            "traced (pt2) MLflow model, which has none to hook.",
            "start the server with the checkpoint (.pt) to get /explain.",
        )
    names = list(explainer.class_names)
    if target is not None and target not in names:
        raise ApiError(422, f"target '{target}' is not a class.", f"use one of {names}.")
    image = await _decode(service, *await _file(file))
    index = names.index(target) if target else None
    # One PyTorch model answering both: on the model thread, so Grad-CAM's hook sees no batch
    shared = explainer is service.predictor and service.batcher is not None
    run = service.batcher.run if shared else run_in_threadpool
    png, label, confidence = await run(_grad_cam_png, service, image, index)
    headers = {"X-Label": label, "X-Confidence": f"{confidence:.6f}"}
    return Response(png, media_type="image/png", headers=headers)


@guarded.get(
    "/metrics",
    tags=["monitoring"],
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "Prometheus text exposition format",
        },
        **_errors(401),
    },
)
async def metrics(service: ServiceDep) -> Response:
    """Prometheus metrics: requests, latency, predictions, confidence, batches, drift."""
    if service.monitor is not None:
        try:
            service.monitor.report()  # refreshes the drift gauges
        except Exception:  # the other metrics stay scrapeable
            log.exception("the drift report failed")
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)


@guarded.get("/monitoring/drift", tags=["monitoring"], responses=_errors(401))
async def drift(service: ServiceDep) -> dict[str, Any]:
    """Two-sample tests of recent requests against the training reference."""
    if service.monitor is None:
        return {"available": False, "reason": service.drift_off}
    return {"available": True, **service.monitor.report()}


@v2_health.get("/live", response_class=Response, responses=EMPTY_OK)
async def live() -> Response:
    """Open Inference Protocol: the server is alive."""
    return Response(status_code=200)


@v2_health.get("/ready", response_class=Response, responses={**EMPTY_OK, **_errors(503)})
@v2_models.get(
    "/ready",
    response_class=Response,
    responses={**EMPTY_OK, **_errors(401, 404, 422, 503)},
    dependencies=[Depends(served_model)],  # 404 before 503
)
async def v2_ready(service: ServiceDep) -> Response:
    """Open Inference Protocol: the server, or the model, is ready."""
    _require_ready(service)
    return Response(status_code=200)


@v2_models.get("", responses=_errors(401, 404, 422))
async def metadata(name: ServedModel, service: ServiceDep) -> dict[str, Any]:
    """Open Inference Protocol: the model's inputs and outputs."""
    p = service.predictor
    return kserve.model_metadata(
        name, p.info.version, p.spec.image_size, list(p.class_names), temperature=p.info.temperature
    )


def _json_or_binary(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}, "application/octet-stream": {"schema": BINARY}}


@v2_models.post(
    "/infer",
    response_class=Response,
    responses={
        200: {
            "description": "probabilities (FP32 [B, C]): JSON, or the binary data extension "
            "(JSON header of Inference-Header-Content-Length bytes, then the raw floats)",
            "content": _json_or_binary(kserve.INFER_RESPONSE_SCHEMA),
        },
        **_errors(400, 401, 404, 413, 415, 422, 503),
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "JSON, or the binary data extension: the JSON header (its length "
            "in the Inference-Header-Content-Length header), then the raw tensors",
            "content": _json_or_binary(kserve.INFER_REQUEST_SCHEMA),
        }
    },
)
async def infer(name: ServedModel, request: Request, service: ServiceDep) -> Response:
    """Open Inference Protocol: UINT8 images or BYTES files in, FP32 probabilities out."""
    body, p = await request.body(), service.predictor
    size = p.spec.image_size
    try:
        parsed = kserve.parse_infer(body, request.headers.get(kserve.HEADER_LENGTH), size)
    except kserve.ProtocolError as exc:
        raise ApiError(400, str(exc), f"see GET /v2/models/{name} for the inputs.") from None
    if parsed.input_name == kserve.BYTES_INPUT:
        _check_count(len(parsed.files), "files", service)
        images = [await _decode(service, data, f"input {i}") for i, data in enumerate(parsed.files)]
        batch = np.stack(images)[:, None] if images else np.zeros((0, 1, size, size), np.uint8)
    else:
        batch = parsed.images
    _check_count(len(batch), "images", service)
    probs = await _submit(service, batch) if len(batch) else np.zeros((0, len(p.class_names)))
    for image, prediction in zip(batch, p.predictions(probs, [None] * len(batch)), strict=True):
        _record(service, image[0], prediction)
    content, headers = kserve.encode_infer(name, p.info.version, parsed, probs)
    return Response(content, headers=headers)


async def page() -> FileResponse:
    """The web page."""
    return FileResponse(STATIC / "index.html")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Warm the model up, start the decode threads and the batcher; drain them at the end."""
    service: Service = app.state.service
    serve = service.settings.serve
    batcher = Batcher(
        service.predictor.probabilities,
        max_batch=serve.max_batch_size,
        max_wait_ms=serve.max_wait_ms,
        queue_size=serve.queue_size,
        enabled=serve.batching,
        on_batch=service.metrics.observe_batch,
    )
    size = service.predictor.spec.image_size
    warm_up = np.zeros((1, 1, size, size), dtype=np.uint8)
    await run_in_threadpool(service.predictor.probabilities, warm_up)  # not in the metrics
    batcher.cpu_clock = model_cpu_clock()  # the model's thread pools exist now
    threads = service.settings.inference.decode_threads or min(4, os.cpu_count() or 1)
    service.decoder = ThreadPoolExecutor(threads, thread_name_prefix="ctscan-decode")
    await batcher.start()
    service.batcher, service.ready = batcher, True
    log.info("ready: %s", service.predictor.info)
    try:
        yield
    finally:
        service.ready = False
        await batcher.stop()  # what is queued still gets its answer
        service.decoder.shutdown(wait=True)


def create_app(service: Service) -> FastAPI:
    """The FastAPI application for one loaded model."""
    serve = service.settings.serve
    app = FastAPI(
        title="ctscan",
        summary="Chest-CT slice classification: adenocarcinoma, large cell, squamous, normal.",
        version=service.predictor.info.version,
        lifespan=lifespan,
    )
    app.state.service = service
    per_file = f"serve.max_upload_bytes = {serve.max_upload_bytes}"
    per_batch = f"{per_file} x serve.max_batch_files = {serve.max_batch_files}"
    batch_limit = serve.max_upload_bytes * serve.max_batch_files + 64 * 1024
    # Open Inference Protocol JSON carries files as base64 text: 4 bytes for every 3
    base64_limit = -(-serve.max_upload_bytes * 4 // 3) * serve.max_batch_files + 64 * 1024
    app.add_middleware(
        BodyLimit,
        default=(serve.max_upload_bytes + 64 * 1024, f"{per_file}, plus 64 KiB for the form"),
        larger={
            "/predict/batch": (batch_limit, f"{per_batch}, plus 64 KiB for the form"),
            "/v2/models/": (base64_limit, f"{per_batch} x 4/3 for base64 in JSON, plus 64 KiB"),
        },
    )
    _install_error_handlers(app)
    # outside BodyLimit: counts its 413s
    app.add_middleware(RequestTiming, metrics=service.metrics, routers=ROUTERS)
    # no security scheme at all without a token
    token = [Depends(_token_check(serve.token))] if serve.token else []
    app.include_router(health_routes)
    app.include_router(guarded, dependencies=token)
    app.include_router(v2_health)
    app.include_router(v2_models, dependencies=token)
    _document_model_name(app, serve.model_name)
    if STATIC.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC), name="static")
        app.add_api_route("/", page, include_in_schema=False)
    return app


async def _upload(request: Request, service: Service) -> tuple[bytes, str]:
    """The image of a /predict request: the raw body, or the multipart field `file` (timed)."""
    wall = time.perf_counter()
    body = await request.body()
    service.metrics.observe_stage("bytes_in", time.perf_counter() - wall)
    if not body:
        raise ApiError(422, "the request has no body: no image file.", "send it (field 'file').")
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if kind in RAW_TYPES:
        return body, "the upload"
    if kind != "multipart/form-data":
        raise ApiError(
            415,
            f"Content-Type '{kind}' is not taken by /predict.",
            "send multipart/form-data (the image in the field 'file') or the image itself as "
            f"the body with Content-Type {', '.join(RAW_TYPES)}.",
        )
    with service.metrics.stage("multipart"):  # the body is in memory: no await suspends here
        async with request.form() as form:
            file = form.get("file")
            if not isinstance(file, StarletteUpload):
                raise ApiError(
                    422,
                    "the request does not fit this route: body.file: Field required.",
                    "send the image in the multipart field 'file' (curl -F file=@a.png).",
                )
            return await _file(file)


async def _file(upload: StarletteUpload) -> tuple[bytes, str]:
    """An uploaded file's bytes and its name for messages."""
    return await upload.read(), (f"'{upload.filename}'" if upload.filename else "the upload")


async def _decode(service: Service, data: bytes, name: str) -> np.ndarray:
    """An upload -> (S, S) uint8, or an ApiError (413 / 415 / 422) that says why not."""
    limit = service.settings.serve.max_upload_bytes
    if len(data) > limit:
        raise ApiError(
            413,
            f"{name} is larger than {limit} bytes.",
            "send a smaller file (serve.max_upload_bytes).",
        )
    if not data:
        raise ApiError(422, f"{name} is empty.", "send an image file.")
    if sniff_format(data) is None:
        raise ApiError(
            415,
            f"{name} is not a PNG, JPEG, BMP, TIFF, WebP or DICOM file.",
            "send a CT slice in one of those formats.",
        )
    try:
        return await service.read(data, name)
    except DataError as exc:
        raise ApiError(422, exc.message, exc.fix) from None
    except Exception as exc:  # a decoder tripping over hostile bytes: still the upload's fault
        log.exception("decoding %s failed unexpectedly", name)
        raise ApiError(
            422,
            f"{name} cannot be decoded ({type(exc).__name__}).",
            "send the slice as PNG or JPEG.",
        ) from None


def _answer_fields(prediction: Prediction) -> dict[str, Any]:
    """What /predict and each /predict/batch item say about one prediction."""
    return {
        "label": prediction.label,
        "class_index": prediction.index,
        "confidence": prediction.confidence,
        "probabilities": prediction.probabilities,
    }


def _check_count(count: int, what: str, service: Service) -> None:
    """413 for more images or files in one request than serve.max_batch_files."""
    limit = service.settings.serve.max_batch_files
    if count > limit:
        raise ApiError(
            413,
            f"{count} {what}; the limit is {limit}.",
            "send fewer per request (serve.max_batch_files).",
        )


def _require_ready(service: Service) -> None:
    """503 (with Retry-After) until the model is warmed up, and again while stopping."""
    if not service.ready:
        raise ApiError(
            503,
            "the model is not ready (loading, or the server is stopping).",
            f"retry after {RETRY_AFTER_S} s.",
        )


async def _submit(service: Service, images: np.ndarray) -> np.ndarray:
    assert service.batcher is not None
    try:
        return await service.batcher.submit(images)
    except QueueFull:
        raise ApiError(
            503,
            "the server is busy: the request queue is full.",
            f"retry after {RETRY_AFTER_S} s, or add replicas / workers.",
        ) from None


def _record(service: Service, image: np.ndarray, prediction: Prediction) -> None:
    """Metrics and the drift window see every answered image; they never fail the answer."""
    service.metrics.observe_prediction(str(prediction.label), float(prediction.confidence or 0))
    if service.monitor is not None:
        try:
            service.monitor.observe(image, prediction.confidence)
        except Exception:
            log.exception("the drift monitor failed to record an image")


def _grad_cam_png(
    service: Service, image: np.ndarray, target: int | None
) -> tuple[bytes, str, float]:
    from ctscan.inference.explain import cam_function, cam_heat, overlay_png

    explainer = service.explainer
    assert explainer is not None and explainer.torch_model is not None
    # One Grad-CAM at a time, forwards included: the hook on the shared model keeps any output
    with service.explain_lock:
        probs = explainer.probabilities(image[None, None])[0]
        index = int(probs.argmax()) if target is None else target
        cam = cam_function(explainer.torch_model[0], explainer.info.name)
        heat = cam_heat(explainer, cam, image, index)
    label = explainer.class_names[index]
    return overlay_png(image, heat, title=f"{label} {probs[index]:.1%}"), label, float(probs[index])


def _token_check(token: str) -> Callable[..., Any]:
    """A dependency (async: no thread hop): the Bearer token must match `token`."""
    expected = token.encode()

    async def check(credentials: BearerCredentials) -> None:
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):  # constant time
            raise ApiError(
                401,
                "a bearer token is required." if credentials is None else "wrong bearer token.",
                "send the header 'Authorization: Bearer <serve.token>'.",
            )

    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {401: {"WWW-Authenticate": "Bearer"}, 503: {"Retry-After": RETRY_AFTER_S}}
        return _json_error(exc.status, exc.error, exc.fix, headers.get(exc.status))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(map(str, err.get('loc', ())))}: {err.get('msg')}" for err in exc.errors()
        )
        fix = "see /docs for the fields each route takes (uploads: field 'file')."
        return _json_error(422, f"the request does not fit this route: {problems}", fix)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error, fix = str(exc.detail), None
        if exc.status_code == 400:  # the multipart parser's refusals
            error = f"the request body cannot be read: {error}"
            fix = "send multipart/form-data, the image in the field 'file' (curl -F file=@a.png)."
        elif exc.status_code == 404:
            fix = "see /docs for the routes."
        elif exc.status_code == 405:
            fix = f"this route takes {(exc.headers or {}).get('Allow', 'another method')}."
        elif exc.status_code == 413:
            fix = limits.FIX
        return _json_error(exc.status_code, error, fix, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)  # the trace stays in the log
        return _json_error(500, "internal error (logged on the server).", None)


def _json_error(status: int, error: str, fix: str | None, headers: Any = None) -> JSONResponse:
    return JSONResponse({"error": error, "fix": fix}, status_code=status, headers=headers)


def _document_model_name(app: FastAPI, name: str) -> None:
    """The OpenAPI schema gives the served model's name as the example of `{model_name}`."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:  # FastAPI's `build` caches its schema there
            for operation in (op for item in build()["paths"].values() for op in item.values()):
                for parameter in operation.get("parameters", []):
                    if parameter.get("name") == "model_name" and parameter.get("in") == "path":
                        parameter["example"] = name
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

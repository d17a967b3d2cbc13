"""THE inference path: a model from a checkpoint, an ONNX file or an MLflow URI, one image API.

    predictor = open_predictor("outputs/runs/x/best.pt", settings=settings)
    predictor.predict_files([Path("scan.png")])          # -> [Prediction(label=..., ...)]
    predictor.probabilities(images)                      # uint8 (B, 1, S, S) -> (B, C)

The preprocessing spec, the class names and the temperature T come from the artifact itself
(checkpoint payload, ONNX `ctscan` metadata, MLflow model metadata), never from the settings.
`logits` are the network's divided by T; `probabilities` their softmax.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctscan.data.transforms import (
    DecodeLimits,
    PreprocessSpec,
    _read_source,
    decode_image,
    resize_square,
    to_gray,
)
from ctscan.engine.metrics import probabilities
from ctscan.engine.temperature import apply_temperature, check_temperature, describe
from ctscan.errors import CheckpointError, CtscanError, DataError, require_extra
from ctscan.files import file_sha256, model_file
from ctscan.inference.dicom import dicom_to_gray, is_dicom

MLFLOW_SCHEMES = ("models:/", "runs:/")
ONNX_METADATA_KEY = "ctscan"  # metadata_props key of an exported ONNX file: JSON, see ops/export
LUNG_WINDOW = (-600.0, 1500.0)  # (level, width) in HU: the window DICOM slices go through
OPENVINO_EXTRA = "pip install 'ctscan[openvino]'"
OPENVINO_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}  # ours -> INFERENCE_PRECISION_HINT
OPENVINO_NAMES = {hint: ours for ours, hint in OPENVINO_HINTS.items()}
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelInfo:
    """Which model answered: reported with every prediction."""

    name: str  # registry model name, e.g. efficientnet_lite0
    source: str  # the path or URI it was opened from
    backend: str  # torch | onnx | openvino
    version: str  # the MLflow model version, or the ctscan version that wrote the file
    sha256: str  # of the checkpoint the weights come from (an export names its checkpoint)
    format: str  # checkpoint | onnx | onnx-int8 | mlflow
    temperature: float = 1.0  # probabilities = softmax(network logits / T); 1.0: uncalibrated
    calibration: str = "uncalibrated"  # what T is, in words ('T = 1.31 (valid, 72 images)')
    precision: str = "fp32"  # what the runtime computes in: fp32 | bf16 | fp16 (int8: the rest)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


@dataclass
class Prediction:
    """The answer for one input: a label with its probabilities, or the reason it failed."""

    path: str | None
    label: str | None = None
    index: int | None = None
    probabilities: dict[str, float] | None = None
    error: str | None = None
    explanation: str | None = None  # the Grad-CAM overlay written for it, if any

    @property
    def confidence(self) -> float | None:
        """The probability of the predicted class."""
        return None if self.probabilities is None else self.probabilities[str(self.label)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: path, label, index, confidence, probabilities; or path and error."""
        if self.error is not None:
            return {"path": self.path, "error": self.error}
        out = {
            "path": self.path,
            "label": self.label,
            "index": self.index,
            "confidence": self.confidence,
            "probabilities": self.probabilities,
        }
        if self.explanation is not None:
            out["explanation"] = self.explanation
        return out


def read_image(
    source: Path | bytes,
    spec: PreprocessSpec,
    *,
    limits: DecodeLimits = DecodeLimits(),
    window: tuple[float, float] = LUNG_WINDOW,
    name: str | None = None,
    stage: Callable[[str], AbstractContextManager] = nullcontext,
) -> np.ndarray:
    """A PNG / JPEG / BMP / TIFF / WebP / DICOM file or upload -> (S, S) uint8, as preprocess does;
    `stage` times the decode and resize steps (serve)."""
    upload = isinstance(source, (bytes, bytearray, memoryview))
    name = name or ("the upload" if upload else f"'{source}'")
    data = _read_source(source, limits.max_bytes, name, upload)
    with stage("decode"):
        if is_dicom(data):  # refuses Rows x Columns > max_pixels before decoding
            gray = dicom_to_gray(
                data, level=window[0], width=window[1], name=name, max_pixels=limits.max_pixels
            )
        else:
            with decode_image(data, **asdict(limits), name=name) as img:  # max_pixels, max_bytes
                gray = to_gray(img)
    with stage("resize"):
        return resize_square(gray, spec.image_size, spec.resize)


class Predictor:
    """A model and the spec of its input; every backend answers through `logits`."""

    def __init__(
        self,
        *,
        spec: PreprocessSpec,
        info: ModelInfo,
        logits_fn: Callable[[np.ndarray], np.ndarray],
        torch_model: Any = None,
    ) -> None:
        self.spec, self.info, self._logits_fn = spec, info, logits_fn
        self.torch_model = torch_model  # (model, channels) for Grad-CAM; None for ONNX
        self.limits, self.window = DecodeLimits(), LUNG_WINDOW
        self.batch_size, self.decode_threads = 32, 0  # decode_threads 0: min(4, cores)

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in the index order of the logits."""
        return self.spec.class_names

    def logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, 1, S, S) -> float32 calibrated logits (B, C): the network's / T."""
        size = self.spec.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (1, size, size):
            raise DataError(
                f"expected uint8 images of shape (B, 1, {size}, {size}), got "
                f"{images.dtype} {tuple(images.shape)}.",
                "decode and resize with ctscan.inference.read_image first.",
            )
        if len(images) == 0:
            return np.zeros((0, len(self.class_names)), dtype=np.float32)
        return np.asarray(self._logits_fn(np.ascontiguousarray(images)), dtype=np.float32)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, 1, S, S) -> calibrated class probabilities (B, C), float64."""
        return probabilities(self.logits(images))

    def read(self, source: Path | bytes, *, name: str | None = None, stage: Any = nullcontext):
        """One file or upload -> the (S, S) uint8 image this model takes (`stage`: read_image)."""
        return read_image(
            source, self.spec, limits=self.limits, window=self.window, name=name, stage=stage
        )

    def predictions(self, probs: np.ndarray, paths: Sequence[str | None]) -> list[Prediction]:
        """Turn probabilities into labelled `Prediction`s."""
        names = self.class_names
        return [
            Prediction(
                path=path,
                label=names[int(row.argmax())],
                index=int(row.argmax()),
                probabilities={n: float(p) for n, p in zip(names, row, strict=True)},
            )
            for row, path in zip(probs, paths, strict=True)
        ]

    def _read_or_error(self, path: Path) -> np.ndarray | str:
        try:
            return self.read(path)
        except DataError as exc:
            return str(exc)

    def _decoded(self, paths: list[Path]) -> Iterator[np.ndarray | str]:
        """Each image or why it cannot be read, in order, decoded at most two batches ahead."""
        threads = self.decode_threads or min(4, os.cpu_count() or 1)
        if threads <= 1:
            yield from map(self._read_or_error, paths)
            return
        ahead: deque[Future] = deque()
        pool = ThreadPoolExecutor(threads, thread_name_prefix="ctscan-decode")
        try:
            for path in paths:
                ahead.append(pool.submit(self._read_or_error, path))
                if len(ahead) > 2 * self.batch_size:
                    yield ahead.popleft().result()
            while ahead:
                yield ahead.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def predict_files(
        self, paths: Iterable[Path], *, progress: Callable[[int], None] | None = None
    ) -> list[Prediction]:
        """Predict every file; a file that cannot be read gets its own `error` row."""
        paths = list(paths)
        results = [Prediction(path=str(path)) for path in paths]
        advance = progress or (lambda done: None)
        batch: list[tuple[int, np.ndarray]] = []

        def flush() -> None:
            if batch:
                probs = self.probabilities(np.stack([img for _, img in batch])[:, None])
                named = self.predictions(probs, [str(paths[i]) for i, _ in batch])
                for (i, _), prediction in zip(batch, named, strict=True):
                    results[i] = prediction
                advance(len(batch))
                batch.clear()

        for i, decoded in enumerate(self._decoded(paths)):
            if isinstance(decoded, str):
                results[i].error = decoded
                advance(1)
            else:
                batch.append((i, decoded))
            if len(batch) >= self.batch_size:
                flush()
        flush()
        return results


def open_predictor(model: str | Path, *, settings: Any, backend: str | None = None) -> Predictor:
    """A Predictor for a checkpoint (.pt) or MLflow URI (torch), or an ONNX file (ONNX Runtime,
    or OpenVINO with backend 'openvino'); `backend`, if given, must name such a runtime."""
    text = str(model)
    is_onnx = not text.startswith(MLFLOW_SCHEMES) and Path(text).suffix.lower() == ".onnx"
    runs_on = ("onnx", "openvino") if is_onnx else ("torch",)
    if backend is not None and backend not in runs_on:
        raise CtscanError(
            f"'{text}' runs on {' or '.join(runs_on)}, not {backend}.",
            "use --backend auto (a checkpoint runs on its ONNX export), or pass a model file "
            f"that runs on {backend}.",
        )
    if text.startswith(MLFLOW_SCHEMES):
        opened = _open_mlflow(text, settings)
    elif is_onnx:
        opened = _open_onnx(Path(text), settings, backend or "onnx")
    else:
        opened = _open_checkpoint(Path(text), settings)
    inference = settings.inference
    opened.limits = DecodeLimits.from_settings(settings.data)
    opened.window = (inference.dicom_window_level, inference.dicom_window_width)
    opened.batch_size, opened.decode_threads = inference.batch_size, inference.decode_threads
    return opened


def _open_checkpoint(path: Path, settings: Any) -> Predictor:
    import torch

    from ctscan.engine.checkpoint import load_model
    from ctscan.engine.evaluate import predict
    from ctscan.engine.runtime import resolve_runtime

    rt = resolve_runtime(settings.train)  # as `ctscan evaluate` runs: same device and precision
    loaded = load_model(path, device=rt.device, channels_last=rt.channels_last)
    spec, temperature = loaded.spec, loaded.temperature

    def logits_fn(images: np.ndarray) -> np.ndarray:
        x, channels = torch.from_numpy(images), loaded.channels
        out = predict(loaded.model, x, mean=spec.mean, std=spec.std, channels=channels, rt=rt)
        return apply_temperature(out, temperature).cpu().numpy()  # as Deployable divides

    info = ModelInfo(
        name=loaded.checkpoint.model_name,
        source=str(path),
        backend="torch",
        version=loaded.checkpoint.ctscan_version,
        sha256=file_sha256(path),
        format="checkpoint",
        temperature=temperature,
        calibration=loaded.checkpoint.calibration_text,
        precision=rt.precision,
    )
    return Predictor(
        spec=spec, info=info, logits_fn=logits_fn, torch_model=(loaded.model, loaded.channels)
    )


def _onnx_metadata(
    props: dict[str, str], path: Path
) -> tuple[dict[str, Any], PreprocessSpec, dict]:
    """The ctscan metadata of an ONNX file (`props`: its metadata_props), its preprocessing and
    its `_calibration_info`."""
    if ONNX_METADATA_KEY not in props:
        raise CheckpointError(
            f"'{path}' is an ONNX file without ctscan metadata (no '{ONNX_METADATA_KEY}' entry): "
            "its class names and preprocessing are unknown.",
            "export it with `ctscan export CHECKPOINT --format onnx`.",
        )
    try:
        meta = json.loads(props[ONNX_METADATA_KEY])
        return meta, PreprocessSpec.from_dict(meta["preprocess"]), _calibration_info(meta, path)
    except (ValueError, KeyError, TypeError, DataError) as exc:
        raise CheckpointError(
            f"'{path}' has broken ctscan metadata ({exc}).", "export it again with ctscan export."
        ) from None


def session_options(settings: Any) -> Any:
    """ONNX Runtime's options: `train.threads` intra-op threads (> 0), no spin-waiting unless
    `inference.onnx_spinning` (a spinning pool takes the CPU the decode threads need)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if (threads := int(settings.train.threads)) > 0:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not settings.inference.onnx_spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _open_onnx(path: Path, settings: Any, backend: str = "onnx") -> Predictor:
    model_file(path, "model", "pass a .onnx file written by `ctscan export`.")
    if backend == "openvino":
        try:
            model = openvino_core().read_model(str(path))
        except Exception as exc:  # OpenVINO raises its own exception types for bad files
            raise _unreadable(path, exc) from None
        key = ["framework", ONNX_METADATA_KEY]  # OpenVINO's metadata_props
        found = model.has_rt_info(key)
        props = {ONNX_METADATA_KEY: model.get_rt_info(key).astype(str)} if found else {}
        meta, spec, calibration = _onnx_metadata(props, path)
        run, precision = openvino_call(
            model, settings.train.threads, _openvino_precision(meta, path)
        )
    else:
        require_extra("export", "an ONNX model", "onnxruntime", fix=" (or [serve])")
        import onnxruntime as ort

        try:
            session = ort.InferenceSession(
                str(path),
                sess_options=session_options(settings),
                providers=["CPUExecutionProvider"],
            )
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise _unreadable(path, exc) from None
        meta, spec, calibration = _onnx_metadata(session.get_modelmeta().custom_metadata_map, path)
        input_name = session.get_inputs()[0].name
        run, precision = (lambda chunk: session.run(None, {input_name: chunk})[0]), "fp32"

    info = ModelInfo(
        name=str(meta.get("model_name", "unknown")),
        source=str(path),
        backend=backend,
        version=str(meta.get("ctscan_version", "unknown")),
        sha256=str(meta.get("checkpoint_sha256") or file_sha256(path)),
        format=str(meta.get("format", "onnx")),
        precision=precision,
        **calibration,
    )
    return Predictor(spec=spec, info=info, logits_fn=lambda images: _in_chunks(run, images))


def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    first = (str(exc).splitlines() or [type(exc).__name__])[0]
    return CheckpointError(
        f"'{path}' is not a readable ONNX model ({first[:200]}).",
        "export it again with `ctscan export`.",
    )


def import_openvino() -> Any:
    """The openvino module, or one CtscanError naming the extra."""
    require_extra("openvino", "--backend openvino", "openvino", fix=", or use --backend onnx")
    import openvino as ov

    return ov


@functools.cache
def openvino_core() -> Any:
    """The process's one OpenVINO Core. Its CPU plugin points the thread's signal stack at a
    buffer of its own while a Core holds it; Cores that overlap and go out of order left the
    stack on a freed buffer, and the next signal (a Ctrl-C) crashed the process (SIGSEGV)."""
    return import_openvino().Core()


def openvino_default_precision() -> str:
    """The precision OpenVINO's CPU plugin computes in by default here: fp32, or bf16 on a CPU
    with AVX512_BF16 or AMX."""
    hint = openvino_core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()
    return OPENVINO_NAMES.get(hint, hint)


def openvino_call(
    model: Any, threads: int, precision: str | None = None
) -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """One OpenVINO CPU infer request on an ONNX file or read model, LATENCY hint, `threads`
    (as ONNX Runtime's session_options; 0: all cores) at `precision` (fp32, bf16; None: the
    CPU's default): (logits of a uint8 batch, the precision it computes in)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = OPENVINO_HINTS[precision]
    model = str(model) if isinstance(model, Path) else model
    try:
        compiled = openvino_core().compile_model(model, "CPU", config)
    except RuntimeError as exc:  # e.g. no kernel for a layer at this precision on this CPU
        at, why = precision or openvino_default_precision(), str(exc).strip().rpartition("\n")[2]
        raise CtscanError(
            f"OpenVINO cannot compile the model on this CPU ({at} precision): {why}",
            'run it on ONNX Runtime: --backend onnx (serve.backend = "onnx").',
        ) from exc
    request, lock = compiled.create_infer_request(), threading.Lock()

    def call(images: np.ndarray) -> np.ndarray:
        with lock:  # one request: one batch at a time
            return request.infer({0: images}, share_inputs=True)[0]

    used = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    return call, OPENVINO_NAMES.get(used, used)


def _openvino_precision(meta: dict[str, Any], path: Path) -> str | None:
    """None (the CPU's default) where `ctscan export` accepted it for this file (its verdicts in
    meta["openvino"]), else fp32; an int8 file with no accepted verdict is refused."""
    verdicts = meta.get("openvino") if isinstance(meta.get("openvino"), dict) else {}
    accepted = {p for p, v in verdicts.items() if isinstance(v, dict) and v.get("accepted") is True}
    default = openvino_default_precision()
    precision = default if default == "fp32" or default in accepted else "fp32"
    if meta.get("format") == "onnx-int8" and precision not in accepted:
        raise CtscanError(
            f"'{path}' is an int8 file with no accepted OpenVINO verdict at {precision} (the "
            "parity rule on the test split, checked by `ctscan export --int8` when openvino is "
            "installed): OpenVINO may answer differently from ONNX Runtime on it.",
            "export the checkpoint again with --int8 where openvino is installed "
            f"({OPENVINO_EXTRA}), or run this file with --backend onnx, or the float32 file "
            "with --backend openvino.",
        )
    if precision != default:
        log.warning(
            "OpenVINO runs '%s' at fp32: this CPU's default, %s, has no accepted verdict in its "
            "metadata (`ctscan export` with openvino installed checks it on the test split)",
            path,
            default,
        )
    return None if precision == default else precision


def _in_chunks(run: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
    """`run` on at most 64 images at a time, the rows concatenated."""
    return np.concatenate([run(images[i : i + 64]) for i in range(0, len(images), 64)])


def _calibration_info(meta: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """ModelInfo's temperature (default 1) and calibration text from a file's ctscan metadata."""
    temperature = check_temperature(meta.get("temperature", 1.0), source)
    calibration = meta.get("calibration")
    text = describe(temperature, calibration if isinstance(calibration, dict) else None)
    return {"temperature": temperature, "calibration": text}


def _open_mlflow(uri: str, settings: Any) -> Predictor:
    import torch

    from ctscan.engine.modelling import Deployable
    from ctscan.engine.tracking import load_logged_model

    module, meta, version = load_logged_model(uri, settings.tracking, settings.paths.runs_dir)
    spec = PreprocessSpec.from_dict(meta["preprocess"])

    @torch.no_grad()
    def logits_fn(images: np.ndarray) -> np.ndarray:
        return _in_chunks(lambda chunk: module(torch.from_numpy(chunk)).float().numpy(), images)

    info = ModelInfo(
        name=str(meta.get("model_name", "unknown")),
        source=uri,
        backend="torch",
        version=str(version),
        sha256=str(meta.get("checkpoint_sha256", "")),
        format="mlflow",
        **_calibration_info(meta, uri),
    )
    # Grad-CAM hooks a layer of the network: a pickled Deployable has it; a pt2 graph has none
    torch_model = (module.net, module.channels) if isinstance(module, Deployable) else None
    return Predictor(spec=spec, info=info, logits_fn=logits_fn, torch_model=torch_model)

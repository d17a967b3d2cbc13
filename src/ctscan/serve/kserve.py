"""The Open Inference Protocol (KServe v2) REST encoding: requests in, responses out.

Inputs (one per request): `image` UINT8 [-1, 1, S, S] (decoded and resized gray) or
`image_bytes` BYTES [-1] (encoded files: raw in the binary extension, base64 in JSON).
Output: `probabilities` FP32 [-1, C], calibrated, in the order of the model's labels.
JSON and the binary data extension (`Inference-Header-Content-Length`, tritonclient's default)
are both read and written: the output is binary when asked per output (`binary_data`) or for
all (`binary_data_output`). Any malformed body ends in a `ProtocolError` (400), nothing else.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

HEADER_LENGTH = "Inference-Header-Content-Length"
IMAGE_INPUT = "image"
BYTES_INPUT = "image_bytes"
OUTPUT = "probabilities"


def _object(required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def _array(items: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "array", "items": items, **extra}


_OBJECT, _STRING = {"type": "object"}, {"type": "string"}
_TENSOR = ["name", "datatype", "shape"]
INFER_REQUEST_SCHEMA = _object(  # the JSON part of a request (OpenAPI / JSON Schema)
    ["inputs"],
    id=_STRING,
    inputs=_array(
        _object(
            _TENSOR,
            name={"type": "string", "enum": [IMAGE_INPUT, BYTES_INPUT]},
            datatype={"type": "string", "enum": ["UINT8", "BYTES"]},
            shape=_array({"type": "integer", "minimum": 0}),
            data={"type": "array", "description": "UINT8: integers 0..255; BYTES: base64 strings"},
            parameters=_OBJECT,
        ),
        minItems=1,
        maxItems=1,
    ),
    outputs=_array(
        _object(["name"], name={"type": "string", "enum": [OUTPUT]}, parameters=_OBJECT)
    ),
    parameters=_OBJECT,
)
INFER_RESPONSE_SCHEMA = _object(  # the JSON answer (without the binary extension)
    ["model_name", "outputs"],
    model_name=_STRING,
    model_version=_STRING,
    id=_STRING,
    outputs=_array(
        _object(
            _TENSOR,
            name=_STRING,
            datatype=_STRING,
            shape=_array({"type": "integer"}),
            data=_array({"type": "number"}),
            parameters=_OBJECT,
        )
    ),
)


class ProtocolError(ValueError):
    """A request the protocol cannot read: answered 400 with the reason."""


@dataclass
class InferRequest:
    """What an infer request asks: one input tensor, and how to send the outputs back."""

    id: str | None
    input_name: str
    images: np.ndarray | None = None  # (B, 1, S, S) uint8, for the `image` input
    files: list[bytes] = field(default_factory=list)  # for the `image_bytes` input
    binary_output: bool = False


def model_metadata(
    name: str, version: str, image_size: int, class_names: list[str], *, temperature: float = 1.0
) -> dict:
    """GET /v2/models/{name}: the model's inputs, outputs, class names and temperature T."""
    return {
        "name": name,
        "versions": [version],
        "platform": "ctscan",
        "inputs": [
            {"name": IMAGE_INPUT, "datatype": "UINT8", "shape": [-1, 1, image_size, image_size]},
            {"name": BYTES_INPUT, "datatype": "BYTES", "shape": [-1]},
        ],
        "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, len(class_names)]}],
        "parameters": {"class_names": class_names, "temperature": temperature},
    }


def _split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part and the binary tail of a request body."""
    n = len(body)  # without the binary extension: all JSON
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ProtocolError(f"{HEADER_LENGTH} '{header_length}' is not a number.") from None
        if not 0 < n <= len(body):
            raise ProtocolError(f"{HEADER_LENGTH} {n} does not fit a body of {len(body)} bytes.")
    try:
        header = json.loads(body[:n])
    except RecursionError:
        raise ProtocolError("the request JSON is nested too deeply.") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"the request is not valid JSON ({exc}).") from None
    if not isinstance(header, dict):
        raise ProtocolError("the request must be a JSON object with 'inputs'.")
    return header, body[n:]


def _unpack_bytes(raw: bytes, count: int) -> list[bytes]:
    """BYTES elements of the binary extension: each a 4-byte little-endian length + the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise ProtocolError("a BYTES element is cut short (no room for its length).")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError("a BYTES element is longer than the data sent.")
        out.append(raw[pos : pos + n])
        pos += n
    if len(out) != count:
        raise ProtocolError(f"the shape says {count} BYTES elements, the data holds {len(out)}.")
    return out


def parse_infer(body: bytes, header_length: str | None, image_size: int) -> InferRequest:
    """Read an infer request (JSON or binary extension); ProtocolError says what is wrong."""
    header, tail = _split_body(body, header_length)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(
            f"send exactly one input: '{IMAGE_INPUT}' (UINT8 [B, 1, {image_size}, "
            f"{image_size}]) or '{BYTES_INPUT}' (BYTES [B])."
        )
    spec = inputs[0]
    name, shape = spec.get("name"), spec.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise ProtocolError(f"input '{name}' needs a shape of non-negative integers.")
    params = spec.get("parameters") or {}
    binary_size = params.get("binary_data_size") if isinstance(params, dict) else None
    request_id = header.get("id") if isinstance(header.get("id"), str) else None
    request = InferRequest(request_id, name, binary_output=_binary_output(header))
    raw = None
    if binary_size is not None:
        if not _is_int(binary_size) or binary_size < 0 or binary_size > len(tail):
            raise ProtocolError(f"input '{name}' binary_data_size does not fit the data sent.")
        raw = tail[:binary_size]
    if name == IMAGE_INPUT:
        request.images = _image_input(spec, shape, raw, image_size)
    elif name == BYTES_INPUT:
        request.files = _bytes_input(spec, math.prod(shape), raw)
    else:
        raise ProtocolError(f"unknown input '{name}'; use '{IMAGE_INPUT}' or '{BYTES_INPUT}'.")
    return request


def _image_input(spec: dict, shape: list[int], raw: bytes | None, image_size: int) -> np.ndarray:
    """The `image` input: UINT8 (B, 1, S, S) from the binary tail or the JSON `data`."""
    if spec.get("datatype") != "UINT8":
        raise ProtocolError(f"input '{IMAGE_INPUT}' must be UINT8, not {spec.get('datatype')}.")
    if len(shape) != 4 or shape[1:] != [1, image_size, image_size]:
        raise ProtocolError(
            f"input '{IMAGE_INPUT}' must have shape [B, 1, {image_size}, {image_size}], "
            f"not {shape}."
        )
    count = math.prod(shape)
    if raw is None:
        array = _json_values(spec.get("data"), count, IMAGE_INPUT)
    elif len(raw) != count:
        raise ProtocolError(f"input '{IMAGE_INPUT}' has {len(raw)} bytes for {count} values.")
    else:
        array = np.frombuffer(raw, dtype=np.uint8)
    return array.reshape(shape).copy()


def _bytes_input(spec: dict, count: int, raw: bytes | None) -> list[bytes]:
    """The `image_bytes` input: files from the binary tail, or base64 strings in JSON `data`."""
    if spec.get("datatype") != "BYTES":
        raise ProtocolError(f"input '{BYTES_INPUT}' must be BYTES, not {spec.get('datatype')}.")
    if raw is not None:
        return _unpack_bytes(raw, count)
    data = spec.get("data")
    strings = isinstance(data, list) and all(isinstance(d, str) for d in data)
    if not strings or len(data) != count:
        raise ProtocolError(f"input '{BYTES_INPUT}' needs {count} base64 strings in 'data'.")
    try:
        return [base64.b64decode(d, validate=True) for d in data]
    except (binascii.Error, ValueError):
        raise ProtocolError(
            f"input '{BYTES_INPUT}': in JSON, BYTES elements are base64 strings."
        ) from None


def _is_int(value: Any) -> bool:
    """A JSON integer (not a bool, which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _binary_output(header: dict[str, Any]) -> bool:
    """Whether the client asked for the output in the binary extension; names are checked."""
    params = header.get("parameters")
    binary = isinstance(params, dict) and params.get("binary_data_output") is True
    outputs = [] if header.get("outputs") is None else header["outputs"]
    if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
        raise ProtocolError("'outputs' must be a list of objects with a 'name'.")
    for output in outputs:
        if output.get("name") != OUTPUT:
            raise ProtocolError(f"unknown output '{output.get('name')}'; the output is '{OUTPUT}'.")
        out_params = output.get("parameters")
        if out_params is not None and not isinstance(out_params, dict):
            raise ProtocolError(f"output '{OUTPUT}' parameters must be an object.")
        if out_params and "binary_data" in out_params:
            binary = out_params["binary_data"] is True
    return binary


def _json_values(data: Any, count: int, name: str) -> np.ndarray:
    """A flat (or nested) JSON list of 0..255 integers as uint8."""
    try:
        array = np.asarray(data).reshape(-1)
    except (TypeError, ValueError, OverflowError, RecursionError):
        raise ProtocolError(f"input '{name}' data must be integers 0..255.") from None
    if array.size and array.dtype.kind not in "iu":  # floats, strings, bools, huge ints
        raise ProtocolError(f"input '{name}' data must be integers 0..255.")
    if array.size != count:
        raise ProtocolError(f"input '{name}' has {array.size} values, its shape needs {count}.")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ProtocolError(f"input '{name}' values must be within 0..255 (UINT8).")
    return array.astype(np.uint8)


def encode_infer(
    model_name: str, version: str, request: InferRequest, probabilities: np.ndarray
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON, or the binary extension when the client asked."""
    probs = np.ascontiguousarray(probabilities, dtype=np.float32)
    output: dict[str, Any] = {"name": OUTPUT, "datatype": "FP32", "shape": list(probs.shape)}
    header: dict[str, Any] = {"model_name": model_name, "model_version": version}
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = [output]
    if request.binary_output:
        raw = probs.tobytes()
        output["parameters"] = {"binary_data_size": len(raw)}
        text = json.dumps(header).encode()
        headers = {HEADER_LENGTH: str(len(text)), "Content-Type": "application/octet-stream"}
        return text + raw, headers
    output["data"] = probs.reshape(-1).tolist()  # float32 -> Python floats
    return json.dumps(header).encode(), {"Content-Type": "application/json"}

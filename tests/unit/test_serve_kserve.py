"""The Open Inference Protocol encoding (serve/kserve.py) as pure functions, and the body sniffing.

Any body, JSON or not, with or without the binary extension's header, ends in an `InferRequest`
or a `ProtocolError` (answered 400): never another exception (a 500). Requests built the way
`tritonclient.http` builds them are read back to the same tensors, and answers are encoded in
the form the client asked for.
"""

from __future__ import annotations

import base64
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctscan.serve import kserve
from ctscan.serve.limits import sniff_format

SIZE = 8


def _binary_request(header: dict, tail: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + tail, str(len(text))


def test_uint8_images_in_the_binary_extension_read_back() -> None:
    images = np.arange(2 * SIZE * SIZE, dtype=np.uint8).reshape(2, 1, SIZE, SIZE)
    header = {
        "id": "req-1",
        "inputs": [
            {
                "name": "image",
                "datatype": "UINT8",
                "shape": [2, 1, SIZE, SIZE],
                "parameters": {"binary_data_size": images.nbytes},
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    body, length = _binary_request(header, images.tobytes())
    parsed = kserve.parse_infer(body, length, SIZE)
    assert parsed.id == "req-1" and parsed.input_name == "image" and parsed.binary_output
    assert parsed.images is not None and np.array_equal(parsed.images, images)


def test_bytes_elements_in_the_binary_extension_and_as_base64_json() -> None:
    files = [b"\x89PNG first", b"", b"third file"]
    raw = b"".join(struct.pack("<I", len(f)) + f for f in files)
    spec = {"name": "image_bytes", "datatype": "BYTES", "shape": [3]}
    body, length = _binary_request(
        {"inputs": [{**spec, "parameters": {"binary_data_size": len(raw)}}]}, raw
    )
    assert kserve.parse_infer(body, length, SIZE).files == files
    as_json = {"inputs": [{**spec, "data": [base64.b64encode(f).decode() for f in files]}]}
    parsed = kserve.parse_infer(json.dumps(as_json).encode(), None, SIZE)
    assert parsed.files == files and not parsed.binary_output


@pytest.mark.parametrize(
    ("outputs", "parameters", "binary"),
    [
        (None, None, False),
        (None, {"binary_data_output": True}, True),  # tritonclient naming no output
        ([{"name": "probabilities"}], None, False),
        ([{"name": "probabilities", "parameters": {"binary_data": True}}], None, True),
        (
            [{"name": "probabilities", "parameters": {"binary_data": False}}],
            {"binary_data_output": True},
            False,
        ),
    ],
)
def test_the_output_is_binary_when_asked(
    outputs: list | None, parameters: dict | None, binary: bool
) -> None:
    request: dict = {"inputs": [{"name": "image", "datatype": "UINT8", "shape": [0, 1, 2, 2]}]}
    request["inputs"][0]["data"] = []
    if outputs is not None:
        request["outputs"] = outputs
    if parameters is not None:
        request["parameters"] = parameters
    assert kserve.parse_infer(json.dumps(request).encode(), None, 2).binary_output is binary


def test_answers_are_encoded_as_asked() -> None:
    probs = np.array([[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]])
    request = kserve.InferRequest(id="x", input_name="image", binary_output=True)
    body, headers = kserve.encode_infer("ctscan", "1", request, probs)
    n = int(headers[kserve.HEADER_LENGTH])
    header = json.loads(body[:n])
    assert header["id"] == "x" and header["outputs"][0]["shape"] == [2, 4]
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(body) - n == 32
    assert np.array_equal(np.frombuffer(body[n:], np.float32).reshape(2, 4), probs.astype("f4"))
    request.binary_output = False
    body, headers = kserve.encode_infer("ctscan", "1", request, probs)
    assert headers["Content-Type"] == "application/json"
    out = json.loads(body)["outputs"][0]
    assert out["datatype"] == "FP32" and np.allclose(out["data"], probs.reshape(-1), atol=1e-7)


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"[" * 100_000, "nested too deeply"),
        (b'{"inputs": 3}', "exactly one input"),
        (
            b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 2, 2]}]}',
            "[B, 1, 8",
        ),
        (b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 8, 8]}]}', "UINT8"),
        (b'{"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1]}]}', "unknown input"),
        (b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [true]}]}', "shape"),
        (
            b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8],'
            b' "data": [1e300]}]}',
            "integers 0..255",
        ),
        (
            b'{"inputs": [{"name": "image", "datatype": "UINT8", "shape": [1, 1, 8, 8],'
            b' "data": [100000000000000000000000000000]}]}',
            "integers 0..255",
        ),
        (
            b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],'
            b' "data": [12]}]}',
            "base64 strings",
        ),
        (
            b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],'
            b' "data": ["AA=="]}], "outputs": 5}',
            "'outputs' must be a list",
        ),
        (
            b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],'
            b' "data": ["AA=="]}], "outputs": [{"name": "logits"}]}',
            "unknown output",
        ),
        (
            b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1],'
            b' "data": ["AA=="]}], "outputs": [{"name": "probabilities", "parameters": [1]}]}',
            "parameters must be an object",
        ),
    ],
)
def test_malformed_requests_are_protocol_errors(body: bytes, words: str) -> None:
    with pytest.raises(kserve.ProtocolError, match=words.replace("[", r"\[")):
        kserve.parse_infer(body, None, SIZE)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)
shapes = st.lists(st.integers(-2, 70), max_size=5) | json_values
inputs = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["image", "image_bytes", "other"]) | json_values,
        "datatype": st.sampled_from(["UINT8", "BYTES", "FP32"]) | json_values,
        "shape": shapes,
        "data": st.lists(st.integers(-5, 300), max_size=80) | json_values,
        "parameters": st.fixed_dictionaries(
            {}, optional={"binary_data_size": st.integers(-5, 100) | json_values}
        )
        | json_values,
    },
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "id": json_values,
        "inputs": st.lists(inputs, max_size=2) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": st.just("probabilities") | json_values,
                    "parameters": st.fixed_dictionaries({}, optional={"binary_data": json_values})
                    | json_values,
                },
            ),
            max_size=2,
        )
        | json_values,
        "parameters": json_values,
    },
)


@settings(max_examples=200, deadline=None)
@given(request=requests | json_values, tail=st.binary(max_size=80), binary=st.booleans())
def test_any_json_is_a_request_or_a_protocol_error(
    request: object, tail: bytes, binary: bool
) -> None:
    text = json.dumps(request).encode()
    body, length = (text + tail, str(len(text))) if binary else (text, None)
    try:
        parsed = kserve.parse_infer(body, length, 2)
    except kserve.ProtocolError:
        return
    if parsed.input_name == kserve.IMAGE_INPUT:
        assert parsed.images is not None and parsed.images.dtype == np.uint8
        assert parsed.images.shape[1:] == (1, 2, 2)
    else:
        assert parsed.input_name == kserve.BYTES_INPUT
        assert all(isinstance(f, bytes) for f in parsed.files)


@settings(max_examples=150, deadline=None)
@given(body=st.binary(max_size=300), length=st.none() | st.text(max_size=6))
def test_any_bytes_are_a_request_or_a_protocol_error(body: bytes, length: str | None) -> None:
    try:
        parsed = kserve.parse_infer(body, length, 2)
    except kserve.ProtocolError as exc:  # the only refusal allowed, and it says why
        assert str(exc)
    else:
        assert isinstance(parsed, kserve.InferRequest)
        assert parsed.input_name in (kserve.IMAGE_INPUT, kserve.BYTES_INPUT)


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\x89PNG\r\n\x1a\n....", "PNG"),
        (b"\xff\xd8\xff\xe0", "JPEG"),
        (b"BM....", "BMP"),
        (b"II*\x00", "TIFF"),
        (b"MM\x00*", "TIFF"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "WEBP"),
        (b"\x00" * 128 + b"DICM", "DICOM"),
        (b"hello", None),
        (b"", None),
    ],
)
def test_uploads_are_sniffed_by_their_first_bytes(head: bytes, fmt: str | None) -> None:
    assert sniff_format(head) == fmt

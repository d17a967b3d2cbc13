"""The one decode -> gray -> resize -> normalize path."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ctscan.data.transforms import (
    DecodeLimits,
    PreprocessSpec,
    decode_image,
    model_input,
    prepare,
    resize_square,
    to_gray,
)
from ctscan.errors import DataError
from tests.conftest import png_header_only, save_gray, smooth_image

MODES = [
    "1",
    "L",
    "LA",
    "P",
    "PA",
    "RGB",
    "RGBA",
    "RGBX",
    "I;16",
    "I;16B",
    "I",
    "F",
    "CMYK",
    "YCbCr",
    "LAB",
    "HSV",
    "La",
    "RGBa",
]
POLICIES = ["pad", "stretch", "crop"]


def _encode(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _image_in_mode(mode: str, h: int, w: int, seed: int = 0) -> Image.Image:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    if mode.startswith("I;16"):
        return Image.fromarray(rgb[..., 0].astype(np.uint16) * 250).convert(mode)
    if mode == "PA":
        return base.convert("P").convert("PA")
    return base.convert(mode)


# ---- decode_image -------------------------------------------------------------------------


def test_decode_reads_a_file_and_keeps_format_and_mode(tmp_path: Path) -> None:
    save_gray(smooth_image(1, 20, 30), tmp_path / "a.png", "RGBA")
    img = decode_image(tmp_path / "a.png")
    assert (img.format, img.mode, img.size) == ("PNG", "RGBA", (30, 20))


def test_decode_bytes_equals_decode_path(tmp_path: Path) -> None:
    save_gray(smooth_image(2, 20, 30), tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    assert np.array_equal(to_gray(decode_image(data)), to_gray(decode_image(tmp_path / "a.png")))


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", r"empty \(0 bytes\)"),
        (b"hello, I am text\n", "not an image"),
        (png_header_only(100_000, 100_000), "decompression bomb"),
        (png_header_only(5_000, 5_000), "above the limit"),
    ],
)
def test_decode_refuses_broken_files_naming_them(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(DataError, match=expected) as err:
        decode_image(path, max_pixels=1_000_000)
    assert "bad.png" in str(err.value)
    with pytest.raises(DataError, match=expected):
        decode_image(content, max_pixels=1_000_000)


def test_decode_refuses_a_truncated_png(tmp_path: Path) -> None:
    save_gray(smooth_image(3, 80, 80), tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        decode_image(tmp_path / "cut.png")
    assert "cut.png" in str(err.value) and "dvc pull" in err.value.fix  # a file on disk
    with pytest.raises(DataError, match="truncated or corrupt") as err:
        decode_image(data[: len(data) // 2])
    assert "send the whole file" in err.value.fix and "dvc" not in err.value.fix  # an upload


def test_decode_checks_pixels_from_the_header_before_decoding() -> None:
    # 3000x3000 mode "1": a tiny file that decodes to 9 million pixels
    data = _encode(Image.new("1", (3000, 3000)))
    assert len(data) < 10_000
    with pytest.raises(DataError, match="9000000 pixels"):
        decode_image(data, max_pixels=1_000_000)
    assert decode_image(data, max_pixels=9_000_000).size == (3000, 3000)


def test_decode_checks_file_size_first(tmp_path: Path) -> None:
    save_gray(smooth_image(4, 50, 50), tmp_path / "a.png")
    with pytest.raises(DataError, match="above the limit of 10 bytes"):
        decode_image(tmp_path / "a.png", max_bytes=10)


def test_decode_leaves_pil_global_limit_alone() -> None:
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(DataError):
        decode_image(png_header_only(100_000, 100_000), max_pixels=10**12)
    decode_image(_encode(Image.new("L", (10, 10))), max_pixels=100)
    assert before == Image.MAX_IMAGE_PIXELS


def test_decode_missing_file_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read"):
        decode_image(tmp_path / "nope.png")


# ---- PNG through libspng ------------------------------------------------------------------


def _png(pixels: np.ndarray, colour: int, depth: int, extra: tuple[bytes, ...] = ()) -> bytes:
    """A PNG written by hand: any colour type and depth, extra chunks before IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    h, w = pixels.shape[:2]
    if depth < 8:  # pack the samples of a row, high bits first
        per_byte = 8 // depth
        padded = np.zeros((h, -(-w // per_byte) * per_byte), np.uint8)
        padded[:, :w] = pixels
        groups = padded.reshape(h, -1, per_byte).astype(np.uint16)
        rows = sum(groups[..., i] << (8 - depth * (i + 1)) for i in range(per_byte))
        raw = rows.astype(np.uint8)
    else:
        raw = pixels.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1).view(np.uint8)
    body = b"".join(b"\0" + row.tobytes() for row in raw)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    chunks = [chunk(b"IHDR", ihdr), *(chunk(k, d) for k, d in extra)]
    chunks += [chunk(b"IDAT", zlib.compress(body)), chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


_PALETTE = (b"PLTE", bytes(range(48)))  # 16 colours
_LAYOUTS = {  # name: (colour type, bit depth, channels, sample maximum, extra chunks, libspng?)
    "gray8": (0, 8, 1, 255, (), True),
    "gray16": (0, 16, 1, 65535, (), True),
    "gray-alpha8": (4, 8, 2, 255, (), True),
    "rgb8": (2, 8, 3, 255, (), True),
    "rgba8": (6, 8, 4, 255, (), True),
    "gray8-trns": (0, 8, 1, 255, ((b"tRNS", b"\0\7"),), True),
    "gray1": (0, 1, 1, 1, (), False),
    "gray4": (0, 4, 1, 15, (), False),
    "gray-alpha16": (4, 16, 2, 65535, (), False),
    "rgb16": (2, 16, 3, 65535, (), False),
    "palette8": (3, 8, 1, 15, (_PALETTE,), False),
    "palette4": (3, 4, 1, 15, (_PALETTE,), False),
    "palette8-trns": (3, 8, 1, 15, (_PALETTE, (b"tRNS", bytes(range(0, 255, 16)))), False),
}


@pytest.fixture
def spng_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the images libspng decodes."""
    import pyspng

    calls: list[int] = []
    load = pyspng.load

    def counted(data: bytes) -> np.ndarray:
        calls.append(1)
        return load(data)

    monkeypatch.setattr(pyspng, "load", counted)
    return calls


@pytest.mark.parametrize("layout", sorted(_LAYOUTS))
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (64, 33)])
def test_png_pixels_are_pillows_whichever_decoder_reads_them(
    layout: str, shape: tuple[int, int], spng_calls: list[int]
) -> None:
    """libspng takes 8-bit L/LA/RGB/RGBA and 16-bit gray; Pillow the rest: the same pixels."""
    colour, depth, channels, top, extra, fast = _LAYOUTS[layout]
    rng = np.random.default_rng(sum(shape) + colour + depth)
    pixels = rng.integers(0, top + 1, (*shape, channels)).squeeze(-1 if channels == 1 else ())
    data = _png(pixels, colour, depth, extra)
    with Image.open(io.BytesIO(data)) as expected:
        expected.load()
        got = decode_image(data)
        assert (got.mode, got.size, got.format) == (expected.mode, expected.size, "PNG")
        assert np.array_equal(np.asarray(got), np.asarray(expected))
        assert np.array_equal(to_gray(got), to_gray(expected))
    assert len(spng_calls) == int(fast)


def test_a_png_with_a_bad_crc_is_left_to_pillow(spng_calls: list[int]) -> None:
    """A chunk whose CRC fails (here after the pixels) is not decoded by libspng."""
    data = _png(np.arange(64, dtype=np.uint8).reshape(8, 8), 0, 8, ())
    broken = data[:-4] + bytes(b ^ 0xFF for b in data[-4:])  # IEND's CRC
    with Image.open(io.BytesIO(broken)) as expected:
        expected.load()
        assert np.array_equal(np.asarray(decode_image(broken)), np.asarray(expected))
    assert spng_calls == []
    cut = data[: len(data) // 2]
    with pytest.raises(DataError, match="truncated or corrupt"):
        decode_image(cut)
    assert spng_calls == []


# ---- to_gray ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(MODES), h=st.integers(1, 40), w=st.integers(1, 40))
def test_to_gray_any_mode_gives_uint8_hw(mode: str, h: int, w: int) -> None:
    gray = to_gray(_image_in_mode(mode, h, w))
    assert gray.dtype == np.uint8
    assert gray.shape == (h, w)
    assert gray.flags.c_contiguous


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("RGB", "TIFF"), ("L", "BMP")],
)
def test_to_gray_is_exact_for_gray_content_in_lossless_modes(mode: str, fmt: str) -> None:
    g = smooth_image(5, 30, 40)
    img = Image.fromarray(g).convert(mode)
    decoded = Image.open(io.BytesIO(_encode(img, fmt)))
    out = to_gray(decoded)
    if mode == "P":  # a palette quantises, but stays close
        assert np.abs(out.astype(int) - g).max() <= 8
    else:
        assert np.array_equal(out, g)


def test_alpha_is_composited_over_black() -> None:
    img = Image.new("RGBA", (4, 2), (200, 200, 200, 255))
    img.putpixel((0, 0), (200, 200, 200, 0))
    img.putpixel((1, 0), (200, 200, 200, 128))
    gray = to_gray(img)
    assert gray[0, 0] == 0
    assert gray[0, 1] == round(200 * 128 / 255)
    assert gray[1, 3] == 200
    la = Image.new("LA", (2, 1), (100, 51))
    assert to_gray(la).tolist() == [[20, 20]]


def test_sixteen_bit_is_stretched_by_its_own_range() -> None:
    a = np.array([[1000, 2000], [3000, 1500]], dtype=np.uint16)
    gray = to_gray(Image.fromarray(a))
    assert gray.tolist() == [[0, 128], [255, 64]]
    flat = Image.fromarray(np.full((3, 3), 4000, dtype=np.uint16))
    assert to_gray(flat).max() == 0
    # an 8-bit picture stored as 16 bits (v * 257) comes back exactly
    g = smooth_image(6, 20, 20).copy()
    g[0, 0], g[0, 1] = 0, 255
    assert np.array_equal(to_gray(Image.fromarray(g.astype(np.uint16) * 257)), g)


def test_float_with_nan_is_finite() -> None:
    a = np.array([[0.0, np.nan], [1.0, 0.5]], dtype=np.float32)
    gray = to_gray(Image.fromarray(a))
    assert gray.tolist() == [[0, 0], [255, 128]]


# ---- resize_square ------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    h=st.integers(1, 90),
    w=st.integers(1, 90),
    size=st.integers(1, 64),
    policy=st.sampled_from(POLICIES),
    value=st.integers(0, 255),
)
def test_resize_shape_dtype_and_constant_images(
    h: int, w: int, size: int, policy: str, value: int
) -> None:
    gray = np.full((h, w), value, dtype=np.uint8)
    out = resize_square(gray, size, policy)
    assert out.shape == (size, size) and out.dtype == np.uint8
    if policy in ("stretch", "crop"):
        assert (out == value).all()
    else:  # pad: the picture is centred, the rest black
        assert out[(size - 1) // 2, (size - 1) // 2] == value
        assert set(np.unique(out)) <= {0, value}


def test_pad_keeps_the_aspect_and_centres() -> None:
    gray = np.full((50, 100), 255, dtype=np.uint8)
    out = resize_square(gray, 64, "pad")
    rows = np.nonzero(out.max(axis=1))[0]
    assert (out[:, 0] > 0).sum() == 32  # full width, half height
    assert rows[0] == 16 and rows[-1] == 47


def test_crop_keeps_the_centre() -> None:
    gray = np.zeros((20, 60), dtype=np.uint8)
    gray[:, 20:40] = 255  # the centre square is white, the sides black
    assert (resize_square(gray, 16, "crop") == 255).all()
    assert (resize_square(gray, 16, "stretch") == 0).any()


def test_resize_rejects_bad_policy_and_input() -> None:
    with pytest.raises(DataError, match="pad, stretch, crop"):
        resize_square(np.zeros((4, 4), np.uint8), 8, "squash")
    with pytest.raises(DataError, match="uint8"):
        resize_square(np.zeros((4, 4), np.float32), 8)


# ---- spec, prepare, model_input --------------------------------------------------------------


def test_spec_round_trip_and_strictness() -> None:
    spec = PreprocessSpec(64, "crop", 0.25, 0.5, ("a", "b"))
    d = spec.to_dict()
    assert d["class_names"] == ["a", "b"] and d["channels"] == 1
    assert PreprocessSpec.from_dict(d) == spec
    with pytest.raises(DataError, match="missing keys"):
        PreprocessSpec.from_dict({k: v for k, v in d.items() if k != "mean"})
    with pytest.raises(DataError, match="unknown keys"):
        PreprocessSpec.from_dict({**d, "gamma": 2})
    with pytest.raises(DataError, match="resize"):
        PreprocessSpec(64, "zoom", 0.25, 0.5, ("a",))


def test_prepare_is_decode_gray_resize(tmp_path: Path) -> None:
    save_gray(smooth_image(7, 30, 50), tmp_path / "a.tiff", "CMYK", "TIFF")
    spec = PreprocessSpec(24, "crop", 0.5, 0.25, ("a",))
    manual = resize_square(to_gray(decode_image(tmp_path / "a.tiff")), 24, "crop")
    assert np.array_equal(prepare(tmp_path / "a.tiff", spec), manual)
    data = (tmp_path / "a.tiff").read_bytes()
    assert np.array_equal(prepare(data, 24, resize="crop"), manual)
    with pytest.raises(DataError):
        prepare(data, 24, limits=DecodeLimits(max_pixels=10, max_bytes=10**6))


def test_model_input_maps_uint8_to_standard_units() -> None:
    batch = torch.tensor([0, 51, 255], dtype=torch.uint8).reshape(1, 1, 1, 3)
    out = model_input(batch, mean=0.2, std=0.5)
    assert out.dtype == torch.float32 and out.shape == batch.shape
    assert torch.allclose(out.flatten(), torch.tensor([-0.4, 0.0, 1.6]), atol=1e-6)
    assert batch.dtype == torch.uint8 and int(batch[0, 0, 0, 2]) == 255  # input untouched
    with pytest.raises(TypeError):
        model_input(batch.float(), mean=0.2, std=0.5)
    three = model_input(batch, mean=0.2, std=0.5, channels=3)
    assert three.shape == (1, 3, 1, 3) and all(
        torch.equal(three[:, c], out[:, 0]) for c in range(3)
    )


@pytest.mark.parametrize(
    ("width", "height"),
    [(10_000, 10_000), (20_000, 10_000)],  # 100 M: Pillow warns; 200 M: Pillow refuses
)
def test_pixel_bombs_get_ctscans_message_and_no_pillow_warning(
    width: int, height: int, recwarn: pytest.WarningsRecorder
) -> None:
    with pytest.raises(DataError) as err:
        decode_image(png_header_only(width, height), max_pixels=40_000_000, name="'bomb.png'")
    message = str(err.value)
    assert f"'bomb.png' claims {width}x{height} = {width * height} pixels" in message
    assert "data.max_image_pixels" in message and "40000000" in message
    assert "decompression bomb DOS attack" not in message  # Pillow's wording
    assert [str(w.message) for w in recwarn] == []


def test_a_limit_above_pillows_hard_limit_still_gives_ctscans_message(
    recwarn: pytest.WarningsRecorder,
) -> None:
    before = Image.MAX_IMAGE_PIXELS
    hard, claimed = 2 * before, 20_000 * 10_000
    assert claimed > hard  # Pillow refuses this one whatever ctscan's limit is
    with pytest.raises(DataError) as err:
        decode_image(png_header_only(20_000, 10_000), max_pixels=300_000_000)
    message = str(err.value)
    assert "20000x10000 = 200000000 pixels" in message
    assert "data.max_image_pixels (300000000)" in message and f"hard limit of {hard}" in message
    assert "decompression bomb DOS attack" not in message
    assert [str(w.message) for w in recwarn] == []
    assert before == Image.MAX_IMAGE_PIXELS  # the process-global limit is left alone

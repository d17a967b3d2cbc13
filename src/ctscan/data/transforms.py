"""The one decode -> gray -> resize -> normalize path: preprocess, evaluate, export and serve.

Choices, fixed here so that training and serving see identical pixels:
- Gray: ITU-R 601-2 luma (Pillow's `convert("L")`). Alpha is composited over black
  (`gray * alpha / 255`, rounded), as CT backgrounds are black. 16/32-bit integer and float
  images are stretched linearly from their own minimum..maximum to 0..255 (a constant image
  becomes 0): such files carry an arbitrary window/level, and `>> 8` would leave a 12-bit CT
  nearly black. 8-bit images are never rescaled.
- Resize: Pillow `BILINEAR` without `reducing_gap`. Pillow's resize widens the filter support
  when it shrinks, so downscaling is antialiased (area-like), and it is exact and deterministic.
- Decode limits: the file size is checked before reading, width x height from the header before
  any pixel is decoded, against ctscan's own limit (data.max_image_pixels); Pillow's bomb warning
  is silenced locally and its hard limit (2 x `Image.MAX_IMAGE_PIXELS`) ends in a ctscan
  `DataError` too. `Image.MAX_IMAGE_PIXELS` is left alone (it is process-global). Only PNG,
  JPEG, BMP, TIFF and WebP are opened; EXIF orientation is ignored (pixels are used as stored).
- PNG pixels: libspng (pyspng) once Pillow has read the header and every chunk passed its CRC,
  for 8-bit L / LA / RGB / RGBA and 16-bit gray (the same pixels as Pillow's, faster); Pillow
  decodes the rest (palette, < 8 bits, 16-bit colour, APNG) and names any defect.

This module imports torch only inside `model_input`, so preprocessing workers stay light.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from ctscan.errors import DataError

if TYPE_CHECKING:
    import torch

RESIZE_POLICIES: tuple[str, ...] = ("pad", "stretch", "crop")
RESAMPLE = Image.Resampling.BILINEAR
DECODE_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP")  # JPEG covers MPO
# PNG (colour type, bit depth) -> the mode Pillow gives it, for the layouts libspng decodes
_SPNG_MODES = {(0, 8): "L", (0, 16): "I;16", (2, 8): "RGB", (4, 8): "LA", (6, 8): "RGBA"}
_BROKEN = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)  # Pillow's


@dataclass(frozen=True)
class DecodeLimits:
    """Refuse files larger than `max_bytes` or images with more than `max_pixels` pixels."""

    max_pixels: int = 40_000_000
    max_bytes: int = 50_000_000

    @classmethod
    def from_settings(cls, data: Any) -> DecodeLimits:
        """Limits from a `DataSettings` section (or anything with the same attributes)."""
        return cls(max_pixels=int(data.max_image_pixels), max_bytes=int(data.max_file_bytes))


def _read_source(source: Path | bytes, max_bytes: int, name: str, upload: bool) -> bytes:
    def too_big(size: int) -> DataError:
        remedy = "send a smaller image" if upload else "remove the file"
        return DataError(
            f"{name} is {size} bytes, above the limit of {max_bytes} bytes.",
            f"{remedy} or raise data.max_file_bytes.",
        )

    if upload:
        data = bytes(source)  # type: ignore[arg-type]
    else:
        try:
            if (size := Path(source).stat().st_size) > max_bytes:
                raise too_big(size)
            with Path(source).open("rb") as fh:
                data = fh.read(max_bytes + 1)
        except OSError as exc:
            raise DataError(f"cannot read {name}: {exc.strerror or exc}.") from None
    if len(data) > max_bytes:  # an upload, or a file that grew while we read it
        raise too_big(len(data))
    if not data:
        raise _damaged_file(f"{name} is empty (0 bytes).", upload=upload)
    return data


def _damaged_file(problem: str, *, upload: bool) -> DataError:
    """An empty or cut-off file, with the fix for an upload (resend) or a file on disk (restore)."""
    resend = "send the whole file again (the upload ended early or was damaged)."
    return DataError(problem, resend if upload else "restore the file (`dvc pull`) or remove it.")


def _claimed_size(data: bytes) -> tuple[int, int] | None:
    """The (width, height) a refused bomb claims, from Pillow's plugins without the bomb check."""
    Image.init()
    for factory, accept in [Image.OPEN[fmt] for fmt in DECODE_FORMATS if fmt in Image.OPEN]:
        try:
            ok = accept(data[:16]) if accept is not None else True
            if not ok or isinstance(ok, str):
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                im = factory(io.BytesIO(data), "")
            with im:
                return im.size
        except Exception:  # only names the size in a message: never let it mask the refusal
            continue
    return None


def _too_many_pixels(name: str, size: tuple[int, int] | None, max_pixels: int) -> DataError:
    hard = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if size is not None:
        width, height = size
        claims = f"{name} claims {width}x{height} = {width * height} pixels"
        if width > 0 and height > 0 and width * height <= max_pixels and hard is not None:
            return DataError(
                f"{claims}: within data.max_image_pixels ({max_pixels}) but above Pillow's hard "
                f"limit of {hard} pixels (2 x PIL.Image.MAX_IMAGE_PIXELS), which ctscan does not "
                "lift; refused as a possible decompression bomb.",
                "downscale the image below that limit, or remove it.",
            )
        return DataError(
            f"{claims}, above the limit of {max_pixels} (data.max_image_pixels); refused as a "
            "possible decompression bomb.",
            "remove the file or raise data.max_image_pixels if it is a genuine image.",
        )
    return DataError(
        f"{name} claims more pixels than Pillow's hard limit of {hard} (2 x "
        f"PIL.Image.MAX_IMAGE_PIXELS), which ctscan does not lift whatever data.max_image_pixels "
        f"({max_pixels}) says; refused as a possible decompression bomb.",
        "downscale the image below that limit, or remove it.",
    )


def decode_image(
    source: Path | bytes,
    *,
    max_pixels: int = DecodeLimits.max_pixels,
    max_bytes: int = DecodeLimits.max_bytes,
    name: str | None = None,
) -> Image.Image:
    """Decode an image file or bytes (first frame, stored mode and `format` kept) into a loaded
    PIL image, refusing bombs and broken files."""
    upload = isinstance(source, (bytes, bytearray, memoryview))
    name = name or ("the image" if upload else f"'{source}'")
    data = _read_source(source, max_bytes, name, upload)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data), formats=DECODE_FORMATS)
        except UnidentifiedImageError:
            raise DataError(
                f"{name} is not an image Pillow can read as {', '.join(DECODE_FORMATS)}.",
                "convert it to PNG or remove it.",
            ) from None
        except Image.DecompressionBombError:
            raise _too_many_pixels(name, _claimed_size(data), max_pixels) from None
        except _BROKEN as exc:
            raise DataError(
                f"{name} has a broken header: {exc}.", "remove or replace it."
            ) from None
        width, height = img.size
        if width <= 0 or height <= 0 or width * height > max_pixels:
            img.close()
            raise _too_many_pixels(name, (width, height), max_pixels)
        fmt = img.format
        if fmt == "PNG" and (fast := _decode_png(data, img)) is not None:
            img.close()
            return fast
        try:
            img.load()
        except Image.DecompressionBombError:  # a plugin that checks again while loading
            img.close()
            raise _too_many_pixels(name, (width, height), max_pixels) from None
        except _BROKEN as exc:
            img.close()
            problem = f"{name} is truncated or corrupt ({fmt or 'unknown format'}): {exc}."
            raise _damaged_file(problem, upload=upload) from None
    return img


def _png_layout(data: bytes) -> tuple[int, int] | None:
    """(colour type, bit depth) of a still PNG whose every chunk is whole and passes its CRC."""
    view, pos, layout = memoryview(data), 8, None
    while pos + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > len(data) or zlib.crc32(view[pos + 4 : end - 4]) != int.from_bytes(
            view[end - 4 : end]
        ):
            return None
        if kind == b"IHDR" and length == 13:
            layout = (data[pos + 17], data[pos + 16])
        elif kind == b"acTL":  # animated: Pillow decodes the first frame
            return None
        elif kind == b"IEND":
            return layout
        pos = end
    return None


def _decode_png(data: bytes, img: Image.Image) -> Image.Image | None:
    """A PNG Pillow has opened, decoded by libspng in the same mode; None: Pillow decodes it."""
    if _SPNG_MODES.get(_png_layout(data)) != img.mode:  # None: a layout libspng does not take
        return None
    try:
        import pyspng

        pixels = pyspng.load(data)  # (H, W) or (H, W, channels); 16-bit gray as (H, W, 2)
    except Exception:  # ImportError, or a defect libspng finds: Pillow's message names it
        return None
    if img.mode == "I;16":
        pixels = pixels[..., 0]  # gray, alpha
    out = Image.fromarray(np.ascontiguousarray(pixels))
    if out.mode != img.mode or out.size != img.size:
        return None
    out.format, out.info = img.format, dict(img.info)
    return out


def _stretch(values: np.ndarray) -> np.ndarray:
    """Linearly map an array's own min..max to 0..255 (uint8); a constant array becomes 0."""
    a = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_gray(img: Image.Image) -> np.ndarray:
    """Convert a PIL image of any mode to a (H, W) uint8 gray array (see the module docstring)."""
    mode = img.mode
    if mode == "L":
        gray = np.asarray(img)
    elif mode in ("I", "F") or mode.startswith("I;"):  # 16/32-bit integer, float
        gray = _stretch(np.asarray(img))
    elif mode in ("P", "PA"):  # via RGB(A): transparency as alpha
        opaque = mode == "P" and "transparency" not in img.info
        return to_gray(img.convert("RGB" if opaque else "RGBA"))
    elif mode in ("LA", "RGBA"):
        gray = np.asarray(img.convert("L"))  # luma, alpha ignored
        alpha = np.asarray(img.getchannel("A"))
        if alpha.min() < 255:  # composite over black
            gray = ((gray.astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)
    elif mode in ("La", "LAB"):  # La is premultiplied: L is already composited over black
        gray = np.asarray(img.getchannel("L"))
    else:  # 1, RGB, RGBX, RGBa, CMYK, YCbCr, HSV, ...
        try:
            gray = np.asarray(img.convert("RGB").convert("L"))
        except (ValueError, OSError) as exc:
            raise DataError(
                f"image mode '{mode}' cannot be converted to gray: {exc}.",
                "convert the image to PNG (L or RGB) first.",
            ) from None
    return np.ascontiguousarray(gray, dtype=np.uint8)


def check_resize(policy: str) -> str:
    """Return `policy` if it is a known resize policy, else raise a DataError naming them."""
    if policy not in RESIZE_POLICIES:
        raise DataError(
            f"resize policy '{policy}' is not one of {', '.join(RESIZE_POLICIES)}.",
            "set data.resize to pad, stretch or crop.",
        )
    return policy


def resize_square(gray: np.ndarray, size: int, policy: str = "pad") -> np.ndarray:
    """Resize a (H, W) uint8 gray array to (size, size) uint8.

    - pad: keep the aspect ratio, scale the long side to `size`, centre it on black.
    - crop: cut the centre square (side = the short side; offsets rounded down), scale it.
    - stretch: scale both sides to `size` independently (the aspect ratio changes).
    """
    check_resize(policy)
    if size < 1:
        raise DataError(f"image size {size} must be at least 1.", "set data.image_size >= 16.")
    if gray.ndim != 2 or gray.dtype != np.uint8:
        raise DataError(f"expected a (H, W) uint8 gray array, got {gray.dtype} {gray.shape}.")
    h, w = gray.shape
    img = Image.fromarray(np.ascontiguousarray(gray))
    if policy == "stretch":
        out = img.resize((size, size), RESAMPLE)
    elif policy == "crop":
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        square = img.crop((left, top, left + side, top + side))  # nothing outside it leaks in
        out = square.resize((size, size), RESAMPLE)
    else:
        scale = size / max(w, h)
        new_w = min(size, max(1, round(w * scale)))
        new_h = min(size, max(1, round(h * scale)))
        out = Image.new("L", (size, size), 0)
        out.paste(img.resize((new_w, new_h), RESAMPLE), ((size - new_w) // 2, (size - new_h) // 2))
    return np.asarray(out, dtype=np.uint8).copy()


@dataclass(frozen=True)
class PreprocessSpec:
    """What a model expects of its input: written into the store, checkpoints and exports."""

    image_size: int
    resize: str
    mean: float
    std: float
    class_names: tuple[str, ...]
    channels: int = 1

    def __post_init__(self) -> None:
        check_resize(self.resize)
        if self.std <= 0:
            raise DataError(f"preprocess spec std {self.std} must be > 0.", "rerun preprocess.")
        object.__setattr__(self, "class_names", tuple(self.class_names))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (class_names as a list)."""
        return {**asdict(self), "class_names": list(self.class_names)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSpec:
        """Rebuild a spec from `to_dict()` output; missing or unknown keys are a DataError."""
        names = {f.name for f in fields(cls)}
        missing = names - {"channels"} - set(d)
        unknown = set(d) - names
        if missing or unknown:
            raise DataError(
                f"preprocess spec has missing keys {sorted(missing)} / unknown keys "
                f"{sorted(unknown)}.",
                "rebuild it with `ctscan preprocess` (or retrain with this ctscan version).",
            )
        try:
            return cls(
                image_size=int(d["image_size"]),
                resize=str(d["resize"]),
                mean=float(d["mean"]),
                std=float(d["std"]),
                class_names=tuple(str(c) for c in d["class_names"]),
                channels=int(d.get("channels", 1)),
            )
        except (TypeError, ValueError) as exc:
            raise DataError(f"preprocess spec {d!r} has a bad value: {exc}.") from None


def prepare(
    source: Path | bytes,
    spec: PreprocessSpec | int,
    *,
    resize: str = "pad",
    limits: DecodeLimits = DecodeLimits(),
    name: str | None = None,
) -> np.ndarray:
    """Decode, gray and resize one image file or upload to (S, S) uint8 as `spec` says."""
    if isinstance(spec, PreprocessSpec):
        spec, resize = spec.image_size, spec.resize
    with decode_image(source, **asdict(limits), name=name) as img:  # max_pixels, max_bytes
        return resize_square(to_gray(img), int(spec), resize)


def model_input(
    images: torch.Tensor,
    *,
    mean: float,
    std: float,
    channels: int = 1,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 gray (B, 1, S, S) -> the model's float input (B, channels, S, S): THE normalisation.

    `augment` (training) runs on the [0, 1] floats; traceable by torch.export.
    """
    import torch

    if images.dtype != torch.uint8:
        raise TypeError(f"model_input expects a uint8 tensor, got {images.dtype}")
    x = images.to(torch.float32) / 255.0  # (B, 1, S, S) float in [0, 1]
    if augment is not None:
        x = augment(x)
    x = (x - mean) / std
    if channels != 1:
        x = x.expand(-1, channels, -1, -1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x

"""DICOM slices -> (H, W) uint8 gray: pydicom, Hounsfield units, a window, as a viewer shows them.

Steps (docs/inference.md, "DICOM input"): decode the pixels; HU = stored x RescaleSlope +
RescaleIntercept (top level or the functional groups); the window [level - width/2, level +
width/2] mapped linearly to 0..255, rounded half up (the plain linear window, not the DICOM VOI
LUT formula); MONOCHROME1 inverted. Colour (RGB / YBR) becomes BT.601 luma, unwindowed.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np

from ctscan.errors import CtscanError, DataError, SettingsError, require_extra

DICM_OFFSET = 128  # the "DICM" marker follows the 128-byte preamble of a DICOM file (Part 10)
INSTALL = "pip install 'ctscan[dicom]'"
DECODERS = "pylibjpeg, pylibjpeg-libjpeg and pylibjpeg-openjpeg"
GRAY = ("MONOCHROME1", "MONOCHROME2")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601


def is_dicom(data: bytes) -> bool:
    """Whether `data` is a DICOM file: the `DICM` marker after the 128-byte preamble."""
    return data[DICM_OFFSET : DICM_OFFSET + 4] == b"DICM"


def _import_pydicom() -> Any:
    require_extra(
        "dicom", "reading DICOM files", "pydicom", fix=f" (and the JPEG decoders {DECODERS})"
    )
    import pydicom
    import pydicom.pixels

    return pydicom


def _number(ds: Any, keyword: str, default: float, name: str) -> float:
    try:
        value = ds.get(keyword, None)
        if value is None or value == "":
            return default
        number = float(value)
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{name} has a bad {keyword} ({exc}; expected one number).",
            "fix the header or export the slice again.",
        ) from None
    if not math.isfinite(number):
        raise DataError(f"{name} has a non-finite {keyword} {value!r}.")
    return number


def _rescale(ds: Any, frame: int, name: str) -> tuple[float, float]:
    """(slope, intercept): top level, else the frame's or the shared functional groups."""
    source = ds if "RescaleSlope" in ds or "RescaleIntercept" in ds else None
    for groups, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        items = ds.get(groups) or []
        if source is None and index < len(items):
            source = (items[index].get("PixelValueTransformationSequence") or [None])[0]
    source = {} if source is None else source  # none: slope 1, intercept 0
    slope = _number(source, "RescaleSlope", 1.0, name)
    return slope, _number(source, "RescaleIntercept", 0.0, name)


def _header_int(ds: Any, keyword: str, default: int | None, name: str) -> int:
    try:
        return int(ds.get(keyword, default))
    except (TypeError, ValueError) as exc:
        raise DataError(
            f"{name} has a missing or bad {keyword} ({exc}).",
            "the file is not a usable image; export the slice again.",
        ) from None


def _check_decoder(pydicom: Any, ds: Any, name: str) -> None:
    """Refuse a transfer syntax that no installed pydicom plugin decodes, naming the fix."""
    syntax = (getattr(ds, "file_meta", None) or {}).get("TransferSyntaxUID")
    if syntax is None:
        raise DataError(
            f"{name} has no transfer syntax in its file meta information.",
            "export it again as a standard DICOM file (with file meta).",
        )
    uid = pydicom.uid.UID(str(syntax))
    label = f"{uid.name} ({uid})" if uid.name != str(uid) else str(uid)
    convert = "or convert it to uncompressed DICOM (e.g. `gdcmconv --raw` or dcmtk's `dcmdjpeg`)"
    try:
        decoder = pydicom.pixels.get_decoder(uid)
    except NotImplementedError:
        raise DataError(
            f"{name} is encoded as {label}, which pydicom cannot decode.",
            f"export the slice as an uncompressed or JPEG Lossless DICOM, {convert}.",
        ) from None
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
        raise DataError(
            f"{name} is compressed as {label} and no installed decoder reads it (missing: "
            f"{missing}).",
            f"{INSTALL} (installs {DECODERS}), {convert}.",
        )


def dicom_to_gray(
    data: bytes,
    *,
    level: float = -600.0,
    width: float = 1500.0,
    frame: int | None = None,
    name: str = "the DICOM file",
    max_pixels: int | None = None,
) -> np.ndarray:
    """A DICOM file's bytes -> the (H, W) uint8 slice through the Hounsfield window (`level` /
    `width`); `frame` (0-based) is required for a multi-frame file."""
    if not (math.isfinite(level) and math.isfinite(width) and width > 0):
        raise SettingsError(
            f"DICOM window level {level} / width {width}: the width must be > 0 and both finite.",
            "set inference.dicom_window_level and inference.dicom_window_width (lung: -600 / "
            "1500).",
        )
    pydicom = _import_pydicom()
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many kinds for broken files; all mean "unreadable"
        raise DataError(
            f"{name} is not a readable DICOM file ({type(exc).__name__}: {exc}).",
            "check that the file is complete (not truncated) or export it again.",
        ) from None
    try:  # pydicom parses values lazily: a malformed element raises late, anywhere below
        rows, columns, frames, index, samples, photometric = _checked_header(
            ds, frame, name, max_pixels
        )
        _check_decoder(pydicom, ds, name)
        try:
            pixels = pydicom.pixels.pixel_array(ds, index=index if frames > 1 else None)
        except Exception as exc:  # a corrupt or truncated codestream, a header that lies, ...
            syntax = ds.file_meta.TransferSyntaxUID
            raise DataError(
                f"cannot decode the pixels of {name} ({syntax.name}): {type(exc).__name__}: {exc}",
                "the file is truncated or corrupt; export it again.",
            ) from None
        if pixels.shape[:2] != (rows, columns) or pixels.ndim != (3 if samples == 3 else 2):
            raise DataError(f"{name} decoded to shape {pixels.shape}, not ({rows}, {columns}).")
        if samples == 3:
            return _luma(pixels, _header_int(ds, "BitsStored", 8, name))
        slope, intercept = _rescale(ds, index, name)
    except CtscanError:
        raise
    except Exception as exc:
        raise DataError(
            f"{name} has a malformed DICOM header ({type(exc).__name__}: {exc}).",
            "export the slice again from the scanner or viewer.",
        ) from exc
    hu = pixels.astype(np.float64) * slope + intercept  # (H, W) Hounsfield units
    gray = window(hu, level=level, width=width)
    return 255 - gray if photometric == "MONOCHROME1" else gray


def _checked_header(
    ds: Any, frame: int | None, name: str, max_pixels: int | None
) -> tuple[int, int, int, int, int, str]:
    """(rows, columns, frames, frame index, samples per pixel, photometric) of a readable slice."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DataError(
            f"{name} holds no pixel data (SOP class {ds.get('SOPClassUID', 'unknown')}): it is "
            "not an image, or it is truncated before the pixels.",
            "pass the image slice itself (CT Image Storage), complete.",
        )
    rows, columns = (_header_int(ds, keyword, None, name) for keyword in ("Rows", "Columns"))
    frames = _header_int(ds, "NumberOfFrames", 1, name) if ds.get("NumberOfFrames") else 1
    samples = _header_int(ds, "SamplesPerPixel", 1, name)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if rows < 1 or columns < 1 or frames < 1:
        raise DataError(f"{name} claims {columns}x{rows} pixels and {frames} frames.")
    if max_pixels is not None and rows * columns > max_pixels:
        raise DataError(
            f"{name} claims {columns}x{rows} = {rows * columns} pixels, above the limit of "
            f"{max_pixels} (data.max_image_pixels).",
            "send a smaller image or raise data.max_image_pixels.",
        )
    if frames > 1 and frame is None:
        raise DataError(
            f"{name} holds {frames} frames; ctscan classifies one slice at a time.",
            f"pick a frame (0-based, 0..{frames - 1}), or export the slice you want alone.",
        )
    index = 0 if frame is None else frame
    if not 0 <= index < frames:
        raise DataError(
            f"frame {frame} is out of range: {name} holds {frames} frame(s), 0..{frames - 1}.",
            f"pick a frame from 0 to {frames - 1}.",
        )
    if samples == 1 and photometric not in GRAY:
        raise DataError(
            f"{name} is {photometric}, which ctscan does not read (grayscale MONOCHROME1 / "
            "MONOCHROME2 and colour RGB / YBR only).",
            "export the slice as a MONOCHROME2 DICOM.",
        )
    if samples not in (1, 3):
        raise DataError(f"{name} has {samples} samples per pixel; expected 1 (gray) or 3 (colour).")
    return rows, columns, frames, index, samples, photometric


def window(hu: np.ndarray, *, level: float, width: float) -> np.ndarray:
    """Map [level - width/2, level + width/2] linearly onto 0..255 (half up, clipped): uint8."""
    low = level - width / 2.0
    scaled = (np.nan_to_num(hu, nan=low) - low) * 255.0 / width  # multiply first: exact halves
    return np.clip(np.floor(scaled + 0.5), 0, 255).astype(np.uint8)


def _luma(rgb: np.ndarray, bits_stored: int) -> np.ndarray:
    """(H, W, 3) RGB of `bits_stored` bits -> (H, W) uint8 BT.601 luma, rounded half up."""
    top = float(2 ** max(1, min(bits_stored, 16)) - 1)
    luma = rgb.astype(np.float64) @ np.array(LUMA)  # (H, W) in 0..top
    return np.clip(np.floor(luma * 255.0 / top + 0.5), 0, 255).astype(np.uint8)

"""DICOM slices: Hounsfield units, the window, inversion, frames, compression and refusals.

Every file is written here with pydicom: 16-bit signed and unsigned CT slices, MONOCHROME1 and
MONOCHROME2, multi-frame (classic and enhanced), RLE Lossless and JPEG 2000 Lossless through
pydicom's encoders, JPEG Lossless (process 14, SV1: the common CT syntax) through the minimal
encoder below (pydicom has no encoder for it), colour RGB, and broken files.
"""

from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.encaps import encapsulate  # noqa: E402
from pydicom.uid import (  # noqa: E402
    MPEG2MPML,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

from ctscan.errors import CtscanError, DataError, SettingsError  # noqa: E402
from ctscan.inference.dicom import dicom_to_gray, is_dicom, window  # noqa: E402

# HU -> uint8 through the lung window (-600 / 1500): floor((hu + 1350) * 255 / 1500 + 0.5)
LUNG = {-3000: 0, -1350: 0, -1000: 60, -600: 128, -300: 179, 0: 230, 150: 255, 3000: 255}
HU = np.array([list(LUNG)], dtype=np.int64)  # (1, 8)
EXPECTED = np.array([list(LUNG.values())], dtype=np.uint8)


def make_dicom(
    stored: np.ndarray,
    *,
    signed: bool = True,
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    photometric: str = "MONOCHROME2",
    syntax: str = ExplicitVRLittleEndian,
) -> Dataset:
    """A CT dataset holding `stored` ((H, W), (F, H, W) or (H, W, 3)) as 16- or 8-bit pixels."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    colour = stored.ndim == 3 and stored.shape[-1] == 3
    if stored.ndim == 3 and not colour:
        ds.NumberOfFrames = stored.shape[0]
    ds.Rows, ds.Columns = stored.shape[-3:-1] if colour else stored.shape[-2:]
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric
    bits = 8 if colour else 16
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = int(signed)
    if colour:
        ds.PlanarConfiguration = 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    dtype = np.uint8 if colour else (np.int16 if signed else np.uint16)
    ds.PixelData = np.ascontiguousarray(stored, dtype=dtype).tobytes()
    if syntax == JPEGLosslessSV1:
        frames = stored if stored.ndim == 3 else stored[None]
        ds.PixelData = encapsulate([jpeg_lossless(f.astype(dtype).view(np.uint16)) for f in frames])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    elif syntax != ExplicitVRLittleEndian:
        ds.compress(syntax, generate_instance_uid=False)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)  # preamble + DICM + file meta
    return buffer.getvalue()


def jpeg_lossless(frame: np.ndarray) -> bytes:
    """A minimal JPEG Lossless encoder (ITU T.81 process 14, predictor 1, 16-bit, one component).

    One Huffman table codes the 17 difference categories with 5-bit codes; differences are taken
    modulo 2^16 as the standard says. Enough for tests: small, slow, correct.
    """
    height, width = frame.shape
    values = frame.astype(np.int64)
    bits: list[str] = []
    for y in range(height):
        for x in range(width):
            if x > 0:
                prediction = values[y, x - 1]
            elif y > 0:
                prediction = values[y - 1, x]
            else:
                prediction = 1 << 15  # 2^(P - 1) for the first sample
            diff = (values[y, x] - prediction) & 0xFFFF
            if diff > 0x8000:
                diff -= 0x10000
            category = 16 if diff == 0x8000 else abs(int(diff)).bit_length()
            bits.append(format(category, "05b"))
            if 0 < category < 16:
                extra = diff if diff > 0 else diff + (1 << category) - 1
                bits.append(format(int(extra), f"0{category}b"))
    stream = "".join(bits)
    stream += "1" * (-len(stream) % 8)  # pad the last byte with ones
    entropy = bytearray()
    for i in range(0, len(stream), 8):
        byte = int(stream[i : i + 8], 2)
        entropy.append(byte)
        if byte == 0xFF:
            entropy.append(0x00)  # byte stuffing
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)  # 17 codes of length 5
    return b"".join(
        [
            b"\xff\xd8",  # SOI
            b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([16]),  # SOF3, 16-bit precision
            height.to_bytes(2, "big") + width.to_bytes(2, "big") + bytes([1, 1, 0x11, 0]),
            b"\xff\xc4" + (2 + 1 + 16 + 17).to_bytes(2, "big") + b"\x00" + counts,  # DHT
            bytes(range(17)),
            b"\xff\xda" + (8).to_bytes(2, "big") + bytes([1, 1, 0x00, 1, 0, 0]),  # SOS, Ss = 1
            bytes(entropy),
            b"\xff\xd9",  # EOI
        ]
    )


def test_is_dicom_looks_for_the_marker_after_the_preamble() -> None:
    data = to_bytes(make_dicom(HU + 1024))
    assert is_dicom(data)
    assert not is_dicom(data[128:])  # no preamble
    assert not is_dicom(b"\x89PNG\r\n\x1a\n" + bytes(200))
    assert not is_dicom(b"")


@pytest.mark.parametrize(
    ("stored", "signed", "slope", "intercept"),
    [
        (HU + 1024, True, 1.0, -1024.0),  # int16, the usual CT rescale
        ((HU + 3000) // 2, False, 2.0, -3000.0),  # uint16, slope 2
        (HU, True, None, None),  # no rescale tags: stored values are HU
    ],
    ids=["int16", "uint16-slope2", "no-rescale"],
)
def test_hounsfield_units_through_the_lung_window(stored, signed, slope, intercept) -> None:
    ds = make_dicom(stored, signed=signed, slope=slope, intercept=intercept)
    gray = dicom_to_gray(to_bytes(ds))
    assert gray.dtype == np.uint8 and gray.shape == (1, 8)
    np.testing.assert_array_equal(gray, EXPECTED)


def test_window_level_and_width_are_honoured() -> None:
    data = to_bytes(make_dicom(np.array([[-160, 40, 240, -1000]]) + 1024))
    mediastinal = dicom_to_gray(data, level=40.0, width=400.0)
    np.testing.assert_array_equal(mediastinal, [[0, 128, 255, 0]])
    np.testing.assert_array_equal(
        window(np.array([-600.0, np.nan]), level=-600, width=1500), [128, 0]
    )
    with pytest.raises(SettingsError, match="width"):
        dicom_to_gray(data, width=0.0)


def test_monochrome1_is_inverted_so_air_stays_dark() -> None:
    stored = HU + 1024
    mono2 = dicom_to_gray(to_bytes(make_dicom(stored)))
    mono1 = dicom_to_gray(to_bytes(make_dicom(stored, photometric="MONOCHROME1")))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    # a MONOCHROME1 slice stores air high: it comes out dark, as MONOCHROME2 air does
    air = dicom_to_gray(to_bytes(make_dicom(np.array([[4000]]), photometric="MONOCHROME1")))
    assert air[0, 0] == 0


def test_multi_frame_needs_a_frame_and_reads_the_one_asked() -> None:
    volume = np.stack([np.full((4, 6), hu + 1024) for hu in (-1350, -600, 150)])  # (3, 4, 6)
    data = to_bytes(make_dicom(volume))
    with pytest.raises(DataError, match="holds 3 frames") as refused:
        dicom_to_gray(data, name="'volume.dcm'")
    assert "'volume.dcm'" in str(refused.value) and "0..2" in str(refused.value)
    for frame, value in enumerate((0, 128, 255)):
        gray = dicom_to_gray(data, frame=frame)
        assert gray.shape == (4, 6) and (gray == value).all()
    for frame in (3, -1):
        with pytest.raises(DataError, match=f"frame {frame} is out of range.*3 frame"):
            dicom_to_gray(data, frame=frame)
    single = to_bytes(make_dicom(HU + 1024))
    np.testing.assert_array_equal(dicom_to_gray(single, frame=0), EXPECTED)
    with pytest.raises(DataError, match="frame 1 is out of range"):
        dicom_to_gray(single, frame=1)


def test_enhanced_multi_frame_takes_the_rescale_of_its_frame_or_the_shared_one() -> None:
    volume = np.stack([np.full((2, 2), 1000), np.full((2, 2), 1000)])  # same stored values
    ds = make_dicom(volume, slope=None, intercept=None)
    per_frame = []
    for intercept in (-2350.0, -1600.0):  # HU -1350, then -600
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = 1.0, intercept
        group = Dataset()
        group.PixelValueTransformationSequence = [transform]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    data = to_bytes(ds)
    assert (dicom_to_gray(data, frame=0) == 0).all()
    assert (dicom_to_gray(data, frame=1) == 128).all()

    del ds.PerFrameFunctionalGroupsSequence
    ds.SharedFunctionalGroupsSequence = per_frame[1:]  # one rescale for every frame
    shared = to_bytes(ds)
    assert all((dicom_to_gray(shared, frame=f) == 128).all() for f in (0, 1))


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLosslessSV1, JPEG2000Lossless])
def test_compressed_slices_decode_to_the_same_pixels(syntax: str) -> None:
    rng = np.random.default_rng(0)
    known = np.tile(HU + 1024, (1, 4))  # (1, 32); openjpeg needs >= 32 px for its 6 levels
    stored = np.concatenate([known, rng.integers(-1000, 2000, (31, 32))])  # (32, 32)
    expected = dicom_to_gray(to_bytes(make_dicom(stored)))
    if syntax == JPEG2000Lossless:
        encoder = pydicom.pixels.get_encoder(syntax)
        if not encoder.is_available:
            pytest.skip(f"no JPEG 2000 encoder here: {encoder.missing_dependencies}")
    if syntax != RLELossless and not pydicom.pixels.get_decoder(syntax).is_available:
        pytest.skip("pylibjpeg plugins are not installed (pip install 'ctscan[dicom]')")
    ds = make_dicom(stored, syntax=syntax)
    assert ds.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(dicom_to_gray(to_bytes(ds)), expected)
    np.testing.assert_array_equal(expected[:1, :8], EXPECTED)


def test_jpeg_lossless_multi_frame() -> None:
    if not pydicom.pixels.get_decoder(JPEGLosslessSV1).is_available:
        pytest.skip("pylibjpeg-libjpeg is not installed (pip install 'ctscan[dicom]')")
    volume = np.stack([HU + 1024, HU[:, ::-1] + 1024])  # (2, 1, 8)
    data = to_bytes(make_dicom(volume, syntax=JPEGLosslessSV1))
    np.testing.assert_array_equal(dicom_to_gray(data, frame=1), EXPECTED[:, ::-1])


def test_colour_becomes_bt601_luma_without_the_window() -> None:
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [0, 0, 0]]])
    gray = dicom_to_gray(to_bytes(make_dicom(rgb, signed=False, photometric="RGB")))
    np.testing.assert_array_equal(gray, [[76, 150, 29, 255, 0]])  # 0.299, 0.587, 0.114 x 255


def test_palette_colour_is_refused() -> None:
    ds = make_dicom(np.zeros((2, 2)), signed=False, photometric="PALETTE COLOR")
    with pytest.raises(DataError, match="PALETTE COLOR"):
        dicom_to_gray(to_bytes(ds), name="'p.dcm'")


def test_an_undecodable_transfer_syntax_is_named() -> None:
    ds = make_dicom(HU + 1024)
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    with pytest.raises(DataError, match="MPEG2 Main Profile") as refused:
        dicom_to_gray(to_bytes(ds), name="'video.dcm'")
    assert "'video.dcm'" in str(refused.value) and "uncompressed" in refused.value.fix


def test_missing_jpeg_decoders_name_the_extra(tmp_path: Path) -> None:
    """Without the pylibjpeg plugins a JPEG Lossless slice says what to install (subprocess)."""
    path = tmp_path / "slice.dcm"
    path.write_bytes(to_bytes(make_dicom(HU + 1024, syntax=JPEGLosslessSV1)))
    script = textwrap.dedent(
        f"""
        import sys
        for blocked in ("pylibjpeg", "libjpeg", "openjpeg", "rle", "gdcm"):
            sys.modules[blocked] = None  # as if not installed
        from pathlib import Path
        from ctscan.errors import DataError
        from ctscan.inference.dicom import dicom_to_gray
        try:
            dicom_to_gray(Path({str(path)!r}).read_bytes(), name="'slice.dcm'")
        except DataError as exc:
            print(exc)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "'slice.dcm'" in out and "JPEG Lossless" in out
    assert "pip install 'ctscan[dicom]'" in out


@pytest.mark.filterwarnings("ignore:Invalid value for VR:UserWarning")
def test_broken_files_are_data_errors_naming_the_file() -> None:
    good = to_bytes(make_dicom(np.full((16, 16), 1000)))
    cases = {
        "garbage": bytes(128) + b"DICM" + bytes(range(256)) * 4,
        "truncated in the pixels": good[:-100],
        "truncated in the header": good[:200],
    }
    for what, data in cases.items():
        with pytest.raises(DataError, match=r"'x\.dcm'") as refused:
            dicom_to_gray(data, name="'x.dcm'")
        assert refused.value.fix, what

    no_pixels = make_dicom(np.zeros((2, 2)))
    del no_pixels.PixelData
    with pytest.raises(DataError, match="holds no pixel data"):
        dicom_to_gray(to_bytes(no_pixels))

    bad_slope = to_bytes(make_dicom(np.zeros((2, 2)), slope=7.5))
    assert bad_slope.count(b"7.5 ") == 1
    with pytest.raises(DataError, match="RescaleSlope"):
        dicom_to_gray(bad_slope.replace(b"7.5 ", b"abc "))


def test_too_many_pixels_are_refused_before_decoding() -> None:
    ds = make_dicom(np.zeros((2, 2)))
    ds.Rows = ds.Columns = 60000  # the header lies; nothing is decoded
    with pytest.raises(DataError, match="3600000000 pixels, above the limit of 1000000"):
        dicom_to_gray(to_bytes(ds), max_pixels=1_000_000)


def test_missing_pydicom_is_a_ctscan_error(monkeypatch: pytest.MonkeyPatch) -> None:
    data = to_bytes(make_dicom(HU + 1024))
    monkeypatch.setitem(sys.modules, "pydicom", None)
    with pytest.raises(CtscanError, match="pydicom") as refused:
        dicom_to_gray(data)
    assert type(refused.value) is CtscanError and refused.value.exit_code == 1
    assert "pip install 'ctscan[dicom]'" in str(refused.value)

"""Shared pytest set-up: fixture plugins, the real-data location, a synthetic raw tree.

Fixture modules of other parts live in tests/unit/conftest_*.py and are registered below.
`real_raw_dir` is the DVC-pulled data (tests using it skip when it is absent).
`raw_tree` (session, read-only) is a small synthetic tree laid out like the Kaggle chest-CT set:
Kaggle folder names, every common PIL mode, PNG/JPEG/WebP/TIFF/BMP, varied sizes, and planted
exact duplicates (within and across splits), a valid/test duplicate, a label conflict, a resized
near copy and files to ignore. `make_raw_tree(variant)` builds a fresh minimal tree with one
fault (see BROKEN_VARIANTS).
"""

from __future__ import annotations

import os
import shutil
import struct
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

LONG = {
    "adenocarcinoma": "adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib",
    "large_cell_carcinoma": "large.cell.carcinoma_left.hilum_T2_N2_M0_IIIa",
    "squamous_cell_carcinoma": "squamous.cell.carcinoma_left.hilum_T1_N2_M0_IIIa",
    "normal": "normal",
}
SHORT = {
    "adenocarcinoma": "adenocarcinoma",
    "large_cell_carcinoma": "large.cell.carcinoma",
    "squamous_cell_carcinoma": "squamous.cell.carcinoma",
    "normal": "normal",
}
FOLDERS = {"train": LONG, "valid": LONG, "test": SHORT}
# (mode, file format, suffix) cycled over the images of the happy tree
VARIANTS = [
    ("L", "PNG", ".png"),
    ("RGB", "JPEG", ".jpg"),
    ("RGBA", "PNG", ".png"),
    ("LA", "PNG", ".png"),
    ("P", "PNG", ".png"),
    ("I;16", "PNG", ".png"),
    ("CMYK", "TIFF", ".tiff"),
    ("RGB", "WEBP", ".webp"),
    ("L", "BMP", ".BMP"),
    ("1", "PNG", ".PNG"),
]
# tests.unit.conftest_mlflow, tests.unit.conftest_store and any later conftest_*.py there
pytest_plugins = sorted(
    f"tests.unit.{p.stem}" for p in (Path(__file__).parent / "unit").glob("conftest_*.py")
)
REAL_RAW_DIR = Path(__file__).resolve().parent.parent / "data" / "chest-ctscan-images"

BROKEN_VARIANTS = (
    "zero_byte",
    "truncated",
    "text_as_png",
    "bomb",
    "empty_class",
    "missing_split",
    "file_in_split",
    "two_folders_one_label",
    "missing_raw_dir",
)


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    """A smooth random (H, W) uint8 picture: distinct seeds give far-apart dHashes."""
    base = np.random.default_rng(seed).integers(0, 256, (6, 6), dtype=np.uint8)
    return np.array(Image.fromarray(base).resize((width, height), Image.Resampling.BICUBIC))


def save_gray(gray: np.ndarray, path: Path, mode: str = "L", fmt: str = "PNG") -> None:
    """Save a gray picture in `mode` and `fmt` (lossless unless the format is JPEG)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        img = Image.fromarray(gray.astype(np.uint16) * 257)
    elif mode == "RGBA":
        img = Image.fromarray(gray).convert("RGBA")
        alpha = np.full(gray.shape, 255, np.uint8)
        alpha[: gray.shape[0] // 4] = 0  # a transparent band: composited to black
        img.putalpha(Image.fromarray(alpha))
    else:
        img = Image.fromarray(gray).convert(mode)
    kwargs = {"lossless": True} if fmt == "WEBP" else {}
    img.save(path, fmt, **kwargs)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG with a valid IHDR claiming width x height (8-bit gray) and an empty IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _write_happy(root: Path) -> None:
    seed = 0
    sizes = [(40, 56), (48, 48), (30, 70), (64, 37), (52, 44)]
    per_split = {"train": 4, "valid": 2, "test": 2}
    for split, folders in FOLDERS.items():
        for folder in folders.values():
            for k in range(per_split[split]):
                mode, fmt, suffix = VARIANTS[seed % len(VARIANTS)]
                h, w = sizes[seed % len(sizes)]
                save_gray(
                    smooth_image(seed, h, w), root / split / folder / f"img{k}{suffix}", mode, fmt
                )
                seed += 1
    d = {s: {lab: root / s / f for lab, f in folders.items()} for s, folders in FOLDERS.items()}
    # exact duplicate within train: same pixels as PNG and as lossless WebP
    dup = smooth_image(1000, 44, 60)
    save_gray(dup, d["train"]["adenocarcinoma"] / "dup_a.png")
    save_gray(dup, d["train"]["adenocarcinoma"] / "dup_b.webp", "RGB", "WEBP")
    # leak: a train picture copied into valid and test
    leak = smooth_image(1001, 50, 50)
    save_gray(leak, d["train"]["normal"] / "leak.png")
    save_gray(leak, d["valid"]["normal"] / "leak_copy.png")
    save_gray(leak, d["test"]["normal"] / "leak_copy.tif", "L", "TIFF")
    # the same picture twice in test (and nowhere else)
    twice = smooth_image(1002, 36, 48)
    save_gray(twice, d["test"]["large_cell_carcinoma"] / "twice_a.png")
    save_gray(twice, d["test"]["large_cell_carcinoma"] / "twice_b.png")
    # in valid and in test, not in train
    vt = smooth_image(1003, 40, 40)
    save_gray(vt, d["valid"]["squamous_cell_carcinoma"] / "vt.png")
    save_gray(vt, d["test"]["squamous_cell_carcinoma"] / "vt.png")
    # label conflict: the same pixels under two labels in train
    conflict = smooth_image(1004, 45, 45)
    save_gray(conflict, d["train"]["large_cell_carcinoma"] / "conflict.png")
    save_gray(conflict, d["train"]["squamous_cell_carcinoma"] / "conflict.png")
    # near copy: a train picture resized and saved again in test
    near = smooth_image(1005, 80, 100)
    save_gray(near, d["train"]["squamous_cell_carcinoma"] / "near.png")
    small = np.asarray(Image.fromarray(near).resize((75, 60), Image.Resampling.BILINEAR))
    save_gray(small, d["test"]["squamous_cell_carcinoma"] / "near_small.png")
    # files that are not images: ignored and listed
    (d["train"]["normal"] / "notes.txt").write_text("not an image")
    (root / "train" / ".DS_Store").write_bytes(b"\x00\x01")


def _write_minimal(root: Path) -> None:
    seed = 500
    for split, folders in FOLDERS.items():
        for folder in folders.values():
            save_gray(smooth_image(seed, 24, 32), root / split / folder / "a.png")
            seed += 1


def _break(root: Path, variant: str) -> None:
    normal = root / "train" / "normal"
    if variant == "zero_byte":
        (normal / "empty.png").write_bytes(b"")
    elif variant == "truncated":
        save_gray(smooth_image(7, 60, 60), normal / "full.png")
        data = (normal / "full.png").read_bytes()
        (normal / "full.png").unlink()
        (normal / "cut.png").write_bytes(data[: len(data) // 2])
    elif variant == "text_as_png":
        (normal / "notes.png").write_text("this is text, not a PNG\n")
    elif variant == "bomb":
        (normal / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    elif variant == "empty_class":
        shutil.rmtree(normal)
        normal.mkdir()
        (normal / "readme.txt").write_text("no images here")
    elif variant == "missing_split":
        shutil.rmtree(root / "valid")
    elif variant == "file_in_split":
        save_gray(smooth_image(8, 20, 20), root / "train" / "stray.png")
    elif variant == "two_folders_one_label":
        save_gray(smooth_image(9, 20, 20), root / "test" / "NORMAL" / "b.png")
    elif variant == "missing_raw_dir":
        shutil.rmtree(root)
    else:
        raise ValueError(f"unknown variant {variant}")


def build_raw_tree(root: Path, variant: str = "happy") -> Path:
    """Write a synthetic raw tree under `root` and return it (see the module docstring)."""
    root.mkdir(parents=True, exist_ok=True)
    if variant == "happy":
        _write_happy(root)
    elif variant == "minimal":
        _write_minimal(root)
    else:
        _write_minimal(root)
        _break(root, variant)
    return root


@pytest.fixture(scope="session")
def real_raw_dir() -> Path:
    """The real raw images pulled by `dvc pull`; the test is skipped if they are absent."""
    if not REAL_RAW_DIR.is_dir():
        message = f"real data not found at {REAL_RAW_DIR}: run `make data` (dvc pull)"
        if os.environ.get("CI"):  # CI pulls the data first: a missing folder is a failure there
            pytest.fail(message)
        pytest.skip(message)
    return REAL_RAW_DIR


@pytest.fixture(scope="session")
def raw_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The happy-path synthetic raw tree (shared: do not modify it)."""
    return build_raw_tree(tmp_path_factory.mktemp("raw") / "chest-ctscan-images")


@pytest.fixture
def make_raw_tree(tmp_path: Path) -> Callable[[str], Path]:
    """Build a fresh tree: `make_raw_tree("minimal")`, or one of BROKEN_VARIANTS."""

    def make(variant: str = "minimal") -> Path:
        return build_raw_tree(tmp_path / variant / "chest-ctscan-images", variant)

    return make


@pytest.fixture(autouse=True)
def _denormals_back_on() -> object:
    """Undo `torch.set_flush_denormal(True)` (training sets it process-wide) after each test.

    Flushed denormals make Hypothesis refuse to generate floats (it needs subnormals), so a
    property test that runs after a training test in the same process would fail.
    """
    yield
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_flush_denormal(False)


@pytest.fixture(autouse=True)
def _one_command_per_test() -> object:
    """A ctscan process runs one command and remembers the stop signals it received (a stop
    swallowed mid-way acts at the next step): each test starts with none, as a process does."""
    import signal

    from ctscan.jobs import forget_stops

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    forget_stops()
    yield
    forget_stops()
    for signum, handler in handlers.items():  # `main()` called in-process installs its own
        if handler is not None:
            signal.signal(signum, handler)


# The files that take a minute or more in CI, slowest first (from a baseline's --durations).
# `make test` (-n 2 --dist loadfile) hands out whole files in collection order (xdist would
# otherwise go by test count, and start a slow file with few tests, such as the integration
# ones, last): these start first, and the many short files fill both workers up to the end.
SLOW_FILES = (
    "tests/integration/test_docs_examples.py",
    "tests/unit/test_train.py",
    "tests/unit/test_model_sources.py",
    "tests/unit/test_sweep.py",
    "tests/integration/test_real_data.py",
    "tests/unit/test_cv.py",
    "tests/unit/test_cli.py",
    "tests/integration/test_input_path.py",
    "tests/unit/test_tracking_store.py",
    "tests/integration/test_export_real.py",
    "tests/unit/test_export.py",
    "tests/unit/test_train_tracking.py",
    "tests/unit/test_model_store.py",
    "tests/unit/test_train_resume.py",
    "tests/integration/test_serve_real.py",
    "tests/unit/test_ensemble.py",
    "tests/unit/test_tracking.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """SLOW_FILES first, then the rest in their usual order (a stable sort)."""
    rank = {name: i for i, name in enumerate(SLOW_FILES)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))


def pytest_configure(config: pytest.Config) -> None:
    """Let Ctrl-C reach the tests and the processes they start, as in a terminal; with xdist,
    hand out the test files in collection order (SLOW_FILES first), and give each worker's
    torch (in the worker and in the processes it starts) one thread.

    Two workers on two cores, each with torch's two threads, is four threads on two cores: the
    OpenMP threads spin waiting for a core the other worker holds (a 3-epoch training on the
    real data took 44 s of CPU instead of 20). Trainings set train.threads=1 for the same
    reason (ctscan gives train.threads=0 every core, whatever OMP_NUM_THREADS says).

    A shell starts a background job (`cmd &` in a script, `nohup`) with SIGINT ignored, Python
    then installs no KeyboardInterrupt handler, and the children inherit the ignore: every
    Ctrl-C test would see its SIGINT vanish (as ctscan rightly does when started that way).
    """
    import signal

    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if hasattr(config.option, "loadscopereorder"):  # xdist's --no-loadscope-reorder
        config.option.loadscopereorder = False
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch = sys.modules.get("torch")  # imported already by a fixture module: tell it too
        if torch is not None:
            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

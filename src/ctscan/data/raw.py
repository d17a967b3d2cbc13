"""Find the raw images on disk and map Kaggle class-folder names to the four canonical labels.

Layout: `<raw_dir>/{train,valid,test}/<class folder>/<image>`. Class folders may carry the long
Kaggle names (`adenocarcinoma_left.lower.lobe_T2_N0_M0_Ib`) or the short ones
(`large.cell.carcinoma`); any case and any of `.`, `_`, `-` or space as separators are accepted.

This module imports no torch: it runs in preprocessing workers and in `ctscan audit`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ctscan import CLASS_NAMES
from ctscan.errors import DataError, close_matches

SPLITS: tuple[str, ...] = ("train", "valid", "test")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
FETCH_FIX = "run `dvc pull` (or `make data`) to fetch the images, or point paths.raw_dir at them."

_SEPARATORS = re.compile(r"[\s._\-]+")
# Words that may follow the class name in a Kaggle folder: where the tumour is and its TNM stage,
# e.g. `_left.lower.lobe_T2_N0_M0_Ib`. Anything else after the class name is rejected.
_LOCATION_WORDS = frozenset({"left", "right", "upper", "lower", "middle", "lobe", "hilum", "lung"})
_STAGE_WORD = re.compile(
    r"^(t[0-4x][a-d]?|n[0-3x][a-c]?|m[01x][a-c]?|i{1,3}[a-c]?|iv[a-c]?|stage)$"
)
_CLASS_TOKENS: dict[tuple[str, ...], str] = {tuple(name.split("_")): name for name in CLASS_NAMES}


@dataclass(frozen=True)
class RawImage:
    """One raw image file with its split and canonical label."""

    path: Path
    split: str
    label: str
    label_index: int

    @property
    def relpath(self) -> str:
        """`split/class folder/file name`: the path relative to the raw directory."""
        return "/".join(self.path.parts[-3:])


@dataclass(frozen=True)
class RawTree:
    """What `scan_raw` found: the images and the files it left out (with the reason)."""

    raw_dir: Path
    images: list[RawImage]
    ignored: list[tuple[Path, str]]


def canonical_label(folder: str) -> str:
    """Map a class-folder name (long or short Kaggle name, any case or separator) to its label."""
    tokens = [t for t in _SEPARATORS.split(folder.strip().lower()) if t]
    for class_tokens, name in _CLASS_TOKENS.items():
        n = len(class_tokens)
        if tuple(tokens[:n]) == class_tokens:
            rest = tokens[n:]
        elif tokens and tokens[0] == "".join(class_tokens):  # `LargeCellCarcinoma`
            rest = tokens[1:]
        else:
            continue
        if all(t in _LOCATION_WORDS or _STAGE_WORD.match(t) for t in rest):
            return name
    raise DataError(
        f"class folder '{folder}' is not one of the known classes ({', '.join(CLASS_NAMES)}; "
        "dots, dashes, spaces and any case are fine, optionally followed by a location/stage "
        "suffix such as '_left.hilum_T2_N2_M0_IIIa')."
        + close_matches("_".join(tokens), CLASS_NAMES),
        "rename the folder to one of the accepted names or remove it.",
    )


def scan_raw(raw_dir: Path | str) -> RawTree:
    """Find every image under `raw_dir`, plus the files that are not images (ignored, listed)."""
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        what = "is not a folder" if raw_dir.exists() else "does not exist"
        raise DataError(f"raw data folder '{raw_dir}' {what}.", FETCH_FIX)
    images: list[RawImage] = []
    why = "not a split folder (train, valid, test)"
    ignored = [(entry, why) for entry in sorted(raw_dir.iterdir()) if entry.name not in SPLITS]
    for split in SPLITS:
        split_dir = raw_dir / split
        if not split_dir.is_dir():
            raise DataError(
                f"split folder '{split_dir}' is missing (expected {', '.join(SPLITS)} "
                f"under '{raw_dir}').",
                FETCH_FIX,
            )
        images.extend(_scan_split(split_dir, split, ignored))
    images.sort(key=lambda r: (SPLITS.index(r.split), r.label_index, r.relpath))
    return RawTree(raw_dir=raw_dir, images=images, ignored=ignored)


def _scan_split(split_dir: Path, split: str, ignored: list[tuple[Path, str]]) -> list[RawImage]:
    found: list[RawImage] = []
    folder_of: dict[str, Path] = {}
    class_dirs = []
    for entry in sorted(split_dir.iterdir()):
        if entry.name.startswith("."):
            ignored.append((entry, "hidden file"))
        elif entry.is_dir():
            class_dirs.append(entry)
        else:
            raise DataError(
                f"'{entry}' is a file directly in the split folder '{split_dir}'; images belong "
                "in a class folder.",
                "move it into its class folder or delete it (then `dvc add data` if tracked).",
            )
    if not class_dirs:
        raise DataError(f"split folder '{split_dir}' has no class folders.", FETCH_FIX)
    for class_dir in class_dirs:
        try:
            label = canonical_label(class_dir.name)
        except DataError as exc:
            raise DataError(f"in '{split_dir}': {exc.message}", exc.fix) from None
        if label in folder_of:
            raise DataError(
                f"folders '{folder_of[label]}' and '{class_dir}' both map to the class '{label}'.",
                "merge them into one folder or remove one.",
            )
        folder_of[label] = class_dir
        index = CLASS_NAMES.index(label)
        before = len(found)
        for item in sorted(class_dir.iterdir()):
            if item.name.startswith("."):
                ignored.append((item, "hidden file"))
            elif item.is_dir():
                ignored.append((item, "folder inside a class folder (not searched)"))
            elif item.suffix.lower() not in IMAGE_SUFFIXES:
                ignored.append((item, f"suffix '{item.suffix}' is not an image suffix"))
            else:
                found.append(RawImage(path=item, split=split, label=label, label_index=index))
        if len(found) == before:
            raise DataError(
                f"class folder '{class_dir}' holds no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}).",
                f"remove the empty folder or restore its images: {FETCH_FIX}",
            )
    return found


def discover(raw_dir: Path | str) -> list[RawImage]:
    """All raw images under `raw_dir`, sorted by split, label and relative path."""
    return scan_raw(raw_dir).images

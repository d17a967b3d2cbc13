"""`ctscan predict`: files and folders in, one Prediction per input, optional Grad-CAM overlays.

Unreadable files are answered in their own row (with the reason) and the others are still
predicted; the caller turns any failed row into a non-zero exit code.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ctscan.data.raw import IMAGE_SUFFIXES
from ctscan.errors import CheckpointError, CtscanError, DataError
from ctscan.inference.predictor import Prediction, Predictor

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
INPUT_SUFFIXES = IMAGE_SUFFIXES | DICOM_SUFFIXES


def collect_inputs(sources: Sequence[Path]) -> list[Path]:
    """Named files as they are (a missing one gets an error row); folders searched recursively."""
    found: list[Path] = []
    for source in sources:
        if source.is_dir():
            files = (p for p in source.rglob("*") if p.suffix.lower() in INPUT_SUFFIXES)
            shown = (p for p in files if not any(s[0] == "." for s in p.relative_to(source).parts))
            inside = sorted(p for p in shown if p.is_file())
            if not inside:
                raise DataError(
                    f"no image or DICOM files in the folder '{source}' "
                    f"(looked for {', '.join(sorted(INPUT_SUFFIXES))}).",
                    "pass image files, or a folder that holds some.",
                )
            found.extend(inside)
        else:
            found.append(source)
    return found


def run_predict(
    predictor: Predictor,
    paths: Sequence[Path],
    *,
    explain_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Prediction]:
    """Predict every file; with `explain_dir`, write a Grad-CAM overlay PNG per predicted file."""
    if explain_dir is not None and predictor.torch_model is None:
        raise CtscanError(
            f"Grad-CAM needs the PyTorch model and its gradients; '{predictor.info.source}' is "
            f"an {predictor.info.format} model without them.",
            "pass the checkpoint (.pt) with --explain, or drop --explain.",
        )
    predictions = predictor.predict_files(paths, progress=progress)
    if explain_dir is not None:
        write_overlays(predictor, predictions, explain_dir)
    return predictions


def _overlay_names(paths: Iterable[str]) -> Iterator[str]:
    """`<stem>.cam.png` per input; a stem seen before gets `-2`, `-3`, ... (no overwrite)."""
    seen: dict[str, int] = {}
    for path in paths:
        stem = Path(path).stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        yield f"{stem}.cam.png" if seen[stem] == 1 else f"{stem}-{seen[stem]}.cam.png"


def write_overlays(predictor: Predictor, predictions: Sequence[Prediction], out: Path) -> None:
    """A Grad-CAM overlay (heat map on the slice, label and confidence) per successful row."""
    from ctscan.files import atomic_write, ensure_dir
    from ctscan.inference.explain import cam_function, cam_heat, overlay_png

    ensure_dir(out, what="--explain folder")
    try:
        cam = cam_function(predictor.torch_model[0], predictor.info.name)
    except ValueError as exc:
        raise CheckpointError(str(exc), "use a checkpoint written by `ctscan train`.") from None
    names = _overlay_names(p.path or "" for p in predictions)
    for prediction, name in zip(predictions, names, strict=True):
        if prediction.error is not None or prediction.path is None:
            continue
        gray = predictor.read(Path(prediction.path))
        heat = cam_heat(predictor, cam, gray, prediction.index)
        png = overlay_png(gray, heat, title=f"{prediction.label} {prediction.confidence:.1%}")
        atomic_write(out / name, png)
        prediction.explanation = str(out / name)


def predictions_csv(predictions: Sequence[Prediction], class_names: Sequence[str]) -> bytes:
    """CSV: path, label, confidence, one probability column per class, error."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["path", "label", "confidence", *(f"p_{n}" for n in class_names), "error"])
    for p in predictions:
        probs = p.probabilities or {}
        confidence = "" if p.confidence is None else f"{p.confidence:.6f}"
        each = ("" if n not in probs else f"{probs[n]:.6f}" for n in class_names)
        writer.writerow([p.path, p.label or "", confidence, *each, p.error or ""])
    return buffer.getvalue().encode()


def as_json_rows(predictions: Sequence[Prediction], info: dict[str, Any]) -> list[dict[str, Any]]:
    """One JSON-ready object per input, each naming the model that answered."""
    return [{**p.to_dict(), "model": info} for p in predictions]

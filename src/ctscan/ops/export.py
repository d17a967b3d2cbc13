"""`ctscan export`: a checkpoint as ONNX (fp32, static int8) and `.pt2`, checked against eager.

Every file holds `LoadedModel.deployable()` (uint8 (B, 1, S, S) in, calibrated float32 logits
out) and `export_metadata`; each is staged beside its target, checked on the test split against
the checkpoint on torch, then renamed into place (docs/export.md). With openvino installed, each
ONNX file's run on OpenVINO at this CPU's default precision is gated like int8 and the verdict
kept in its metadata (`--backend openvino` reads it). `cached_onnx` is the export `ctscan
predict` and `ctscan serve` run a checkpoint on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

import ctscan
from ctscan.data.reference import CONFIDENCE_FILE
from ctscan.errors import CtscanError, require_extra
from ctscan.files import atomic_write, built_aside, ensure_dir
from ctscan.inference.predictor import ONNX_METADATA_KEY as METADATA_KEY

if TYPE_CHECKING:
    import torch

    from ctscan.engine.checkpoint import Checkpoint
    from ctscan.settings import Settings

FORMATS = ("onnx", "pt2", "all")  # all: onnx and pt2 (int8 only with --int8)
OPSET = 20  # ai.onnx opset: ONNX Runtime >= 1.17 (the floor of the [export] extra) runs it
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
PT2_EXTRA_FILE = f"{METADATA_KEY}.json"  # the same JSON in a .pt2 file's extra files
MAX_BATCH = 4096  # upper bound of the dynamic batch axis
FP32_TOLERANCE = 1e-4  # max |logit difference| vs eager for a float32 export
INT8_MIN_AGREEMENT = 0.98  # argmax agreement with eager on the test split
INT8_MAX_ACCURACY_DROP = 0.01  # 1 point of test accuracy
CALIBRATION_BATCH = 16  # int8 calibration: every train image of the store, 16 at a time
INT8_KEEP_FP32: tuple[str, ...] = ("stem",)  # parts left in float32 (see fp32_node_names)
INT8_CALIBRATION = "minmax-avg"  # min/max averaged over the batches (see quantize_onnx)
TRITON_MAX_BATCH = 32
TRITON_QUEUE_DELAY_US = 2000
CACHE_FOLDER = "serve-cache"  # under paths.runs_dir: checkpoints exported for predict and serve


@dataclass(frozen=True)
class ExportPlan:
    """Where each requested file goes (None: not requested)."""

    folder: Path  # the folder of the onnx / int8 / pt2 files
    onnx: Path | None = None
    int8: Path | None = None
    pt2: Path | None = None
    triton_dir: Path | None = None


@dataclass
class Parity:
    """How one format answers on the test split, against the eager checkpoint."""

    format: str  # eager | onnx | onnx-int8 | pt2
    path: Path
    max_abs_diff: float  # max |logit difference| vs eager
    agreement: float  # fraction of test images with the same argmax as eager
    accuracy: float  # test accuracy
    accepted: bool = True
    note: str = ""


@dataclass
class ExportResult:
    """What `run_export` wrote and how each format compared with eager."""

    checkpoint: Path
    model_name: str
    n_test: int
    opset: int | None
    parity: list[Parity]
    paths: list[Path]  # files written, in order (the Triton files last)
    triton_model_dir: Path | None = None
    warnings: list[str] = field(default_factory=list)
    error: CtscanError | None = None  # an int8 refusal: raised by the CLI after the table


def plan_outputs(
    checkpoint: Path,
    *,
    fmt: str,
    int8: bool = False,
    out: Path | None = None,
    triton_dir: Path | None = None,
) -> ExportPlan:
    """Resolve the output paths and make their folders: `out` is the file for one format, the
    folder for `all` (default: beside the checkpoint); int8 goes beside the ONNX file."""
    if fmt not in FORMATS:
        raise CtscanError(
            f"--format '{fmt}' is not one of {', '.join(FORMATS)}.", "use --format onnx."
        )
    for flag, asked in (("--int8", int8), ("--triton", triton_dir is not None)):
        if asked and fmt == "pt2":
            raise CtscanError(
                f"{flag} works on the ONNX model, but --format is '{fmt}'.",
                f"use --format onnx or --format all with {flag}.",
            )
    stem = checkpoint.stem
    if fmt == "all":
        if out is not None and out.suffix.lower() in (".onnx", ".pt2") and not out.is_dir():
            raise CtscanError(
                f"--out '{out}' looks like a file, but --format all writes several files.",
                "pass a folder for --format all, or one format with a file for --out.",
            )
        folder = ensure_dir(out if out is not None else checkpoint.parent, what="export folder")
        onnx_path, pt2_path = folder / f"{stem}.onnx", folder / f"{stem}.pt2"
    else:
        target = out if out is not None else checkpoint.with_name(f"{stem}.{fmt}")
        if target.is_dir():
            raise CtscanError(
                f"--out '{target}' is a folder; for --format {fmt} it names the file.",
                f"pass a file such as '{target / f'{stem}.{fmt}'}' (or --format all for a folder).",
            )
        if target.suffix.lower() != f".{fmt}":
            raise CtscanError(
                f"--out '{target}' does not end in .{fmt}.",
                f"name the file '{target.with_suffix(f'.{fmt}').name}' (runtimes and "
                "`ctscan predict` pick the format from the suffix).",
            )
        folder = ensure_dir(target.parent, what="export folder")
        target = folder / target.name
        onnx_path, pt2_path = (target, None) if fmt == "onnx" else (None, target)
    int8_path = onnx_path.with_name(f"{onnx_path.stem}.int8.onnx") if int8 and onnx_path else None
    if triton_dir is not None:
        triton_dir = ensure_dir(triton_dir, what="Triton model repository")
    return ExportPlan(folder, onnx_path, int8_path, pt2_path, triton_dir)


def require_onnx_tools() -> None:
    """onnx, onnxscript and onnxruntime importable, else one error naming the extra."""
    require_extra("export", "ONNX export", "onnx", "onnxscript", "onnxruntime")


def export_metadata(checkpoint: Checkpoint, *, checkpoint_sha256: str, fmt: str) -> dict[str, Any]:
    """The JSON an exported file carries: what the model is, what it takes and gives back."""
    import torch

    spec = checkpoint.spec
    size, classes = spec.image_size, len(spec.class_names)
    return {
        "model_name": checkpoint.model_name,
        "class_names": list(spec.class_names),
        "preprocess": spec.to_dict(),
        "ctscan_version": ctscan.__version__,
        "torch_version": str(torch.__version__),
        "checkpoint_sha256": checkpoint_sha256,
        "checkpoint_epoch": checkpoint.epoch,
        "temperature": checkpoint.temperature,
        "calibration": checkpoint.calibration,
        "format": fmt,
        "opset": OPSET if fmt.startswith("onnx") else None,
        "input": {
            "name": INPUT_NAME,
            "dtype": "uint8",
            "shape": ["batch", 1, size, size],
            "description": f"gray CT slices, decoded and resized to {size}x{size} "
            f"(resize='{spec.resize}'), 0..255; normalisation and channel repeat are inside",
        },
        "output": {
            "name": OUTPUT_NAME,
            "dtype": "float32",
            "shape": ["batch", classes],
            "description": "calibrated logits in class_names order: the network's logits "
            f"divided by temperature {checkpoint.temperature:g} (softmax gives the calibrated "
            "probabilities; the argmax is unchanged)",
        },
    }


def _example_and_dims(size: int) -> tuple[tuple[torch.Tensor], tuple[dict[int, Any]]]:
    """An example batch (of 2: 1 would specialise the batch axis) and its dynamic batch axis."""
    import torch

    example = torch.zeros((2, 1, size, size), dtype=torch.uint8)  # (B, 1, S, S) uint8
    return (example,), ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def write_onnx(deployable: torch.nn.Module, path: Path, *, size: int, meta: dict[str, Any]) -> int:
    """Export `deployable` to one ONNX file with a dynamic batch axis and our metadata; opset."""
    import warnings

    import onnx
    import torch

    example, dims = _example_and_dims(size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            deployable,
            example,
            dynamo=True,
            dynamic_shapes=dims,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=OPSET,
            verbose=False,
        )
    model = program.model_proto
    set_onnx_metadata(model, meta)
    model.doc_string = (
        f"ctscan {meta['model_name']}: uint8 gray {meta['input']['shape']} -> float32 logits "
        f"{meta['output']['shape']}"
    )
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return onnx_opset(model)


def set_onnx_metadata(model: Any, meta: dict[str, Any]) -> None:
    """Put `meta` as JSON under metadata_props["ctscan"], keeping the other entries."""
    import onnx

    props = {p.key: p.value for p in model.metadata_props}
    onnx.helper.set_model_props(model, props | {METADATA_KEY: json.dumps(meta)})


def read_onnx_metadata(path: Path) -> dict[str, Any]:
    """The ctscan JSON of an exported ONNX file (KeyError if it has none)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return json.loads({p.key: p.value for p in model.metadata_props}[METADATA_KEY])


def onnx_opset(model: Any) -> int:
    """The ai.onnx opset a model imports."""
    return next(int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx"))


def write_pt2(deployable: torch.nn.Module, path: Path, *, size: int, meta: dict[str, Any]) -> None:
    """torch.export the deployable with a dynamic batch axis and save it (metadata as extra)."""
    import torch

    example, dims = _example_and_dims(size)
    program = torch.export.export(deployable, example, dynamic_shapes=dims)
    torch.export.save(program, str(path), extra_files={PT2_EXTRA_FILE: json.dumps(meta)})


def pt2_logits(path: Path, images: np.ndarray, batch: int = 64) -> np.ndarray:
    """Logits of a saved .pt2 file, read back with torch.export.load: (N, C) float32."""
    import torch

    module = torch.export.load(str(path)).module()
    x = torch.from_numpy(images)  # (N, 1, S, S) uint8
    with torch.no_grad():
        chunks = [module(x[i : i + batch]).float() for i in range(0, len(x), batch)]
    return torch.cat(chunks).numpy()


def fp32_node_names(model: Any, keep: tuple[str, ...]) -> list[str]:
    """Names of the nodes `keep` picks: 'stem' the first Conv, 'head' the last weighted node."""
    weighted = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    parts = {"stem": weighted[:1], "head": weighted[-1:]}
    if unknown := set(keep) - set(parts):
        raise ValueError(f"unknown parts {sorted(unknown)}: use {sorted(parts)}")
    return [name for part in keep for name in parts[part]]


def quantize_onnx(
    fp32_path: Path,
    path: Path,
    images: np.ndarray,
    *,
    meta: dict[str, Any],
    keep_fp32: tuple[str, ...] = INT8_KEEP_FP32,
    method: str = INT8_CALIBRATION,
) -> dict[str, Any]:
    """Static QDQ int8 of an fp32 ONNX file calibrated on `images`, `keep_fp32` parts left in
    float32; `method`: minmax | minmax-avg | percentile | entropy (docs/export.md); its settings."""
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    minmax = method.startswith("minmax")
    calibrate_method = CalibrationMethod.MinMax if minmax else CalibrationMethod[method.title()]
    settings = {
        "method": "static",
        "format": "QDQ",
        "per_channel": True,
        "weight_type": "int8",
        "activation_type": "uint8",
        "reduce_range": False,
        "calibration": method,
        "calibration_images": len(images),
        "calibration_split": "train",
        "pre_process": True,
        "fp32_parts": list(keep_fp32),
    }
    prepared = path.with_name(f".{path.stem}.prep.onnx")
    try:
        quant_pre_process(str(fp32_path), str(prepared))
        quantize_static(
            str(prepared),
            str(path),
            # the histogram calibrators stack every batch's outputs: one image at a time keeps
            # the shapes equal (ONNX Runtime 1.32 fails on a shorter last batch)
            _calibration_reader(images, CALIBRATION_BATCH if minmax else 1),
            per_channel=True,  # QDQ format, int8 weights, no reduce_range: ORT's defaults
            activation_type=QuantType.QUInt8,
            calibrate_method=calibrate_method,
            nodes_to_exclude=fp32_node_names(onnx.load(str(prepared)), keep_fp32),
            extra_options={"CalibMovingAverage": method == "minmax-avg"},
        )
    finally:
        prepared.unlink(missing_ok=True)
    model = onnx.load(str(path))
    set_onnx_metadata(model, {**meta, "quantization": settings})
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return settings


def _calibration_reader(images: np.ndarray, step: int) -> Any:
    """ONNX Runtime's calibration input: uint8 batches of `step` images, as the graph takes them."""
    from onnxruntime.quantization import CalibrationDataReader

    batches = ({INPUT_NAME: images[i : i + step]} for i in range(0, len(images), step))

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(batches, None)

    return Reader()


def triton_config(
    name: str, *, image_size: int, num_classes: int, max_batch_size: int = TRITON_MAX_BATCH
) -> str:
    """A Triton `config.pbtxt` for an exported ONNX file: uint8 (1, S, S) in, fp32 (C) out
    (Triton adds the batch axis), with dynamic batching."""
    size, labels = f"{image_size}, {image_size}", 'label_filename: "labels.txt"'
    return f"""name: "{name}"
platform: "onnxruntime_onnx"
max_batch_size: {max_batch_size}
input [ {{ name: "{INPUT_NAME}" data_type: TYPE_UINT8 dims: [ 1, {size} ] }} ]
output [ {{ name: "{OUTPUT_NAME}" data_type: TYPE_FP32 dims: [ {num_classes} ] {labels} }} ]
dynamic_batching {{ max_queue_delay_microseconds: {TRITON_QUEUE_DELAY_US} }}
"""


def write_triton_layout(repository: Path, onnx_path: Path, name: str, spec: Any) -> Path:
    """`repository/<name>/1/model.onnx` + `config.pbtxt` + `labels.txt`, each written
    atomically (version 1 replaced); returns the model folder."""
    config = triton_config(name, image_size=spec.image_size, num_classes=len(spec.class_names))
    model_dir = ensure_dir(repository / name, what="Triton model folder")
    version_dir = ensure_dir(model_dir / "1", what="Triton model version folder")
    contents = {
        version_dir / "model.onnx": onnx_path.read_bytes(),
        model_dir / "labels.txt": ("\n".join(spec.class_names) + "\n").encode(),
        model_dir / "config.pbtxt": config.encode(),
    }
    for path, data in contents.items():
        atomic_write(path, data)
    return model_dir


def compare(
    fmt: str, path: Path, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray
) -> Parity:
    """One format's logits against the eager reference on the same images."""
    if not len(labels):
        return Parity(fmt, path, max_abs_diff=0.0, agreement=1.0, accuracy=0.0)
    diff = float(np.abs(logits - reference).max())
    agreement = float((logits.argmax(1) == reference.argmax(1)).mean())
    return Parity(fmt, path, diff, agreement, accuracy=float((logits.argmax(1) == labels).mean()))


def int8_refusal(row: Parity, eager: Parity) -> str | None:
    """Why the int8 model is refused by the rule, or None if it is accepted."""
    reasons = []
    if row.agreement < INT8_MIN_AGREEMENT:
        reasons.append(
            f"it agrees with eager on {row.agreement:.1%} of the test images "
            f"(needs >= {INT8_MIN_AGREEMENT:.0%})"
        )
    if (drop := eager.accuracy - row.accuracy) > INT8_MAX_ACCURACY_DROP + 1e-9:
        reasons.append(
            f"its test accuracy {row.accuracy:.1%} is {drop * 100:.1f} points below eager's "
            f"{eager.accuracy:.1%} (at most {INT8_MAX_ACCURACY_DROP * 100:.0f} allowed)"
        )
    return "; ".join(reasons) or None


def staging(folder: Path, name: str) -> tempfile.TemporaryDirectory[str]:
    """A temporary folder inside `folder` (same file system: renames are atomic), removed after."""
    return tempfile.TemporaryDirectory(
        prefix=f".{name}.export-", suffix=".tmp", dir=folder, ignore_cleanup_errors=True
    )


class _Reference:
    """What each staged file is checked against: eager's logits on `images` (N, 1, S, S) uint8,
    on the CPU in float32 (`labels` None: eager's own answers stand in)."""

    def __init__(
        self,
        settings: Settings,
        checkpoint: Path,
        ckpt: Checkpoint,
        images: np.ndarray,
        labels: Any,
    ) -> None:
        from ctscan.files import file_sha256
        from ctscan.inference import open_predictor

        train = settings.train.model_copy(update={"device": "cpu", "precision": "fp32"})
        self.settings = settings.model_copy(update={"train": train})
        self.ckpt, self.sha256, self.images = ckpt, file_sha256(checkpoint), images
        predictor = open_predictor(checkpoint, settings=self.settings, backend="torch")
        self.logits = predictor.logits(images)
        self.labels = self.logits.argmax(1) if labels is None else labels

    def meta(self, fmt: str) -> dict[str, Any]:
        return export_metadata(self.ckpt, checkpoint_sha256=self.sha256, fmt=fmt)

    def compare(self, fmt: str, target: Path, path: Path) -> Parity:
        """The parity row of the ONNX or .pt2 file at `path` (to be moved to `target`)."""
        from ctscan.inference import open_predictor

        if path.suffix == ".pt2":
            logits = pt2_logits(path, self.images)
        else:
            logits = open_predictor(path, settings=self.settings).logits(self.images)
        return compare(fmt, target, logits, self.logits, self.labels)


def run_export(
    settings: Settings,
    checkpoint: Path | str,
    *,
    fmt: str = "onnx",
    int8: bool = False,
    out: Path | None = None,
    triton_dir: Path | None = None,
) -> ExportResult:
    """The `ctscan export` command: export and check each file on the test split; a float32 file
    off by over FP32_TOLERANCE raises (nothing written), a refused int8 one is `result.error`."""
    from ctscan.data.store import open_model_store
    from ctscan.engine.checkpoint import load_model, read_checkpoint
    from ctscan.engine.runtime import configure_threads

    checkpoint = Path(checkpoint)
    ckpt = read_checkpoint(checkpoint)  # missing, a folder, broken: one CheckpointError
    plan = plan_outputs(checkpoint, fmt=fmt, int8=int8, out=out, triton_dir=triton_dir)
    if plan.onnx is not None:
        require_onnx_tools()
    store = open_model_store(settings, ckpt)
    configure_threads(settings.train.threads, 1)
    test = store.split("test")
    images = np.ascontiguousarray(test.images.numpy())  # (N, 1, S, S) uint8
    ref = _Reference(settings, checkpoint, ckpt, images, test.labels.numpy())
    rows = [compare("eager", checkpoint, ref.logits, ref.logits, ref.labels)]
    deployable = load_model(ckpt).deployable()
    error, warnings = None, [store.raw_warning] if store.raw_warning else []
    with staging(plan.folder, checkpoint.stem) as stage_dir:
        stage = Path(stage_dir)
        staged, opset = _stage_float32(plan, stage, ref, deployable, rows)
        _fill_cache(ref, staged.get(plan.onnx))
        if plan.int8 is not None:  # beside the ONNX file
            path = stage / plan.int8.name
            calibration = store.split("train").images.numpy()  # (N, 1, S, S) uint8, every one
            quantize_onnx(staged[plan.onnx], path, calibration, meta=ref.meta("onnx-int8"))
            rows.append(ref.compare("onnx-int8", plan.int8, path))
            error = _int8_refusal(rows[-1], rows[0], plan, n_float=len(staged))
            if error is None:
                staged[plan.int8] = path
        if plan.onnx is not None and find_spec("openvino") is not None:
            warnings += _gate_openvino(ref, rows, staged, plan)
        written = _commit(staged, stage, plan.folder, checkpoint)
    triton_model_dir = None
    if plan.triton_dir is not None:  # only with an ONNX file (plan_outputs)
        name = f"ctscan-{ckpt.model_name}"
        triton_model_dir = write_triton_layout(plan.triton_dir, plan.onnx, name, ckpt.spec)
        written += [triton_model_dir / f for f in ("1/model.onnx", "config.pbtxt", "labels.txt")]
    n_test = len(ref.labels)
    return ExportResult(
        checkpoint, ckpt.model_name, n_test, opset, rows, written, triton_model_dir, warnings, error
    )


def _stage_float32(
    plan: ExportPlan, stage: Path, ref: _Reference, deployable: Any, rows: list[Parity]
) -> tuple[dict[Path, Path], int | None]:
    """Write the float32 files into `stage`, each checked against eager (its row into `rows`);
    target -> staged file, and the ONNX opset (None without ONNX)."""
    size, staged, opset = ref.ckpt.spec.image_size, {}, None
    for target, fmt in ((plan.onnx, "onnx"), (plan.pt2, "pt2")):
        if target is None:
            continue
        path = stage / target.name
        if fmt == "onnx":
            opset = _reuse_cached(ref, path) or write_onnx(
                deployable, path, size=size, meta=ref.meta(fmt)
            )
        else:
            write_pt2(deployable, path, size=size, meta=ref.meta(fmt))
        row = ref.compare(fmt, target, path)
        if row.max_abs_diff > FP32_TOLERANCE:
            raise CtscanError(
                f"the {fmt} export differs from the eager model by {row.max_abs_diff:.2e} in the "
                f"logits on {len(ref.labels)} images (the limit is {FP32_TOLERANCE:g}): nothing "
                "was written.",
                "this is an exporter problem: retry with CTSCAN_DEBUG=1 and report it; meanwhile "
                "use the other format (or --backend torch).",
            )
        rows.append(row)
        staged[target] = path
    return staged, opset


def _reuse_cached(ref: _Reference, path: Path) -> int | None:
    """The checkpoint's cached export (predict, serve and `ctscan export` leave it in the serve
    cache) copied to `path` if it carries the very metadata this export writes, and its opset;
    else None. torch.onnx.export takes 7-10 s even for a small model."""
    import onnx

    cache = cache_path(ref.settings, ref.sha256)
    try:
        if read_onnx_metadata(cache) != json.loads(json.dumps(ref.meta("onnx"))):
            return None
        shutil.copyfile(cache, path)
        return onnx_opset(onnx.load(str(path), load_external_data=False))
    except Exception:  # no cache, or one that does not read: export anew
        return None


def _fill_cache(ref: _Reference, path: Path | None) -> None:
    """A checked float32 export enters the serve cache of an existing `paths.runs_dir` (if it
    has none yet and can be written): predict, serve and the next export start from it."""
    from ctscan.files import folder_problem

    cache = cache_path(ref.settings, ref.sha256)
    if path is None or cache.is_file() or not Path(ref.settings.paths.runs_dir).is_dir():
        return
    if folder_problem(cache.parent) is None:
        with built_aside(cache) as aside:
            shutil.copyfile(path, aside)


def cache_path(settings: Settings, sha256: str) -> Path:
    """Where the serve cache keeps a checkpoint's ONNX export (by the checkpoint's sha256)."""
    return Path(settings.paths.runs_dir) / CACHE_FOLDER / f"{sha256[:24]}.onnx"


def _commit(staged: dict[Path, Path], stage: Path, folder: Path, checkpoint: Path) -> list[Path]:
    """Move the staged files into place, each atomically; serve's drift reference goes along."""
    drift = checkpoint.parent / CONFIDENCE_FILE
    if staged and drift.is_file() and folder.resolve() != checkpoint.parent.resolve():
        staged[folder / CONFIDENCE_FILE] = Path(shutil.copy(drift, stage))
    for target, path in staged.items():
        with built_aside(target) as aside:  # its permissions, rename and folder fsync
            os.replace(path, aside)
    return list(staged)


def _int8_refusal(
    row: Parity, eager: Parity, plan: ExportPlan, *, n_float: int
) -> CtscanError | None:
    """None if the int8 row passes the rule; else the row is marked and the error says why."""
    refusal = int8_refusal(row, eager)
    if refusal is None:
        return None
    row.accepted, row.note = False, "refused: not written"
    older = (
        f" The {plan.int8.name} already there is from an earlier export and was left as it was."
        if plan.int8.exists()
        else ""
    )
    return CtscanError(
        f"the int8 model was refused: {refusal}. {plan.int8} was not written; the "
        f"float32 file{'s were' if n_float > 1 else ' was'}.{older}",
        f"deploy {plan.onnx.name} (float32), or retrain and export again (a model "
        "that is further from its decision boundaries quantises better).",
    )


def _gate_openvino(
    ref: _Reference, rows: list[Parity], staged: dict[Path, Path], plan: ExportPlan
) -> list[str]:
    """OpenVINO's run of each staged ONNX file at this CPU's default precision (an int8 file's at
    fp32 too; a float32 file at fp32 is exact) against eager, by the int8 rule: rows into `rows`,
    verdicts into the file's metadata (`openvino`: precision -> agreement, accuracy, accepted),
    which `--backend openvino` reads; a warning per refusal."""
    import onnx

    from ctscan.inference.predictor import _in_chunks, openvino_call, openvino_default_precision

    default, warnings = openvino_default_precision(), []
    for fmt, target in (("onnx", plan.onnx), ("onnx-int8", plan.int8)):
        if target not in staged:
            continue
        path, verdicts = staged[target], {}
        for precision in sorted({default, "fp32"} if fmt == "onnx-int8" else {default} - {"fp32"}):
            try:
                run, used = openvino_call(path, ref.settings.train.threads, precision)
            except CtscanError as exc:  # no verdict: --backend openvino runs it at fp32 or not
                warnings.append(f"{target.name}: {exc.message}")
                continue
            logits = _in_chunks(run, ref.images)
            row = compare(f"{fmt} openvino {used}", target, logits, ref.logits, ref.labels)
            refusal = int8_refusal(row, rows[0])
            verdicts[used] = {
                "agreement": row.agreement,
                "accuracy": row.accuracy,
                "accepted": refusal is None,
            }
            if refusal is not None:
                row.accepted, row.note = False, "refused: --backend openvino won't use it"
                warnings.append(f"OpenVINO at {used} on {target.name} was refused: {refusal}.")
            rows.append(row)
        if verdicts:
            model = onnx.load(str(path))
            set_onnx_metadata(model, read_onnx_metadata(path) | {"openvino": verdicts})
            onnx.save_model(model, str(path))
    return warnings


def cached_onnx(checkpoint: Path, settings: Settings) -> Path:
    """The checkpoint's ONNX export, keyed by its sha256 in `paths.runs_dir/serve-cache/` (else
    a temporary folder): a file enters the cache only once it matches eager on random images."""
    from ctscan.files import file_sha256, folder_problem

    target = cache_path(settings, file_sha256(checkpoint))
    if target.is_file():
        return target
    if folder_problem(target.parent) is not None:
        target = Path(tempfile.mkdtemp(prefix="ctscan-onnx-")) / target.name
    require_onnx_tools()
    from ctscan.engine.checkpoint import load_model, read_checkpoint  # torch: only on a miss

    ckpt = read_checkpoint(checkpoint)
    size = ckpt.spec.image_size
    images = np.random.default_rng(0).integers(0, 256, (8, 1, size, size), dtype=np.uint8)
    ref = _Reference(settings, checkpoint, ckpt, images, None)
    with staging(target.parent, target.stem) as stage_dir:
        stage = Path(stage_dir)
        plan = ExportPlan(target.parent, onnx=target)
        staged, _ = _stage_float32(plan, stage, ref, load_model(ckpt).deployable(), [])
        with built_aside(target) as aside:  # its permissions, rename and folder fsync
            os.replace(staged[target], aside)
    return target

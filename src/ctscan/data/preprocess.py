"""Raw images -> audited, leak-checked, resized uint8 tensors in the processed store.

`run_preprocess` does: discover -> decode + gray + hashes + resize (a process pool) -> audit ->
leak policy -> mean/std and the drift reference of the train split -> write the store,
audit.json and reference.json. `run_audit` does the same without resizing or writing. Nothing
is dropped silently: bad files are an error or, with on_bad_file="skip", listed in the audit and
in meta.json; leak-policy drops are listed too.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ctscan import CLASS_NAMES
from ctscan.data.audit import (
    AuditReport,
    BadFile,
    ImageRecord,
    audit,
    dhash64,
    leak_policy,
    pixel_hash,
    thumbnail,
)
from ctscan.data.raw import SPLITS, RawImage, RawTree, scan_raw
from ctscan.data.reference import build_reference
from ctscan.data.store import (
    Split,
    check_store_target,
    find_dvc_hash,
    raw_fingerprint,
    write_store,
)
from ctscan.data.transforms import (
    DecodeLimits,
    PreprocessSpec,
    check_resize,
    decode_image,
    resize_square,
    to_gray,
)
from ctscan.errors import DataError
from ctscan.files import folder_lock
from ctscan.jobs import critical

Progress = Callable[[int, int], None]  # progress(done, total)
# Below this many images a pool costs more than it saves.
POOL_MIN_IMAGES = 64
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class _Job:
    index: int
    path: str
    name: str
    size: int | None  # None: audit only, no resize
    resize: str
    max_pixels: int
    max_bytes: int


@dataclass(frozen=True)
class _Done:
    index: int
    error: str | None = None
    pixel_hash: str = ""
    dhash: int = 0
    width: int = 0
    height: int = 0
    mode: str = ""
    format: str | None = None
    file_bytes: int = 0
    thumb: bytes = b""
    image: np.ndarray | None = None  # (S, S) uint8


def _process(job: _Job) -> _Done:
    """Decode one file and compute everything preprocessing needs from it (runs in a worker)."""
    try:
        img = decode_image(
            Path(job.path), max_pixels=job.max_pixels, max_bytes=job.max_bytes, name=job.name
        )
        with img:
            fmt, mode, (width, height) = img.format, img.mode, img.size
            gray = to_gray(img)
    except DataError as exc:
        return _Done(index=job.index, error=exc.message)
    return _Done(
        index=job.index,
        pixel_hash=pixel_hash(gray),
        dhash=dhash64(gray),
        thumb=thumbnail(gray),
        width=width,
        height=height,
        mode=mode,
        format=fmt,
        file_bytes=os.path.getsize(job.path),
        image=None if job.size is None else resize_square(gray, job.size, job.resize),
    )


def _init_worker(parent: int) -> None:
    """Pool workers leave Ctrl-C and SIGTERM to the parent and die with it: killed, it leaves
    none of them writing to its closed pipe (each a BrokenPipeError traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not ctscan's handler, inherited by fork
    if sys.platform == "linux":
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        if os.getppid() != parent:  # it died before prctl
            os._exit(0)


def _start_pool(ctx: Any, processes: int) -> Any:
    """A pool whose workers ignore SIGINT; a Ctrl-C while it starts is raised, not lost.

    A terminal's Ctrl-C reaches every process of the group: the parent raises KeyboardInterrupt
    and terminates the pool, the workers must not each print a traceback. SIGINT is held while
    the parent forks (a worker forked then inherits the holding handler, harmless, until its
    initializer ignores SIGINT); a Ctrl-C in that moment is raised once the pool exists, which
    is then terminated. (Ignoring SIGINT around the fork lost it; blocking it in the main thread
    only let another thread take it and raise mid-start, leaking the workers.)
    """
    pool = None
    try:
        with critical(signal.SIGINT):
            pool = ctx.Pool(processes=processes, initializer=_init_worker, initargs=(os.getpid(),))
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    return pool


def _run_jobs(jobs: list[_Job], workers: int | None, progress: Progress | None) -> list[_Done]:
    total = len(jobs)
    if workers is None:
        workers = os.cpu_count() or 1
    done: list[_Done | None] = [None] * total
    if workers <= 1 or total < POOL_MIN_IMAGES:
        for n, job in enumerate(jobs, 1):
            done[job.index] = _process(job)
            if progress:
                progress(n, total)
    else:
        # fork on Linux: workers start at once and need no `if __name__ == "__main__"` guard in
        # the caller; they run only PIL/numpy code, never torch. Elsewhere fork is unsafe.
        methods = mp.get_all_start_methods()
        method = "fork" if sys.platform == "linux" and "fork" in methods else "spawn"
        ctx = mp.get_context(method)
        chunk = max(1, total // (workers * 8))
        with _start_pool(ctx, min(workers, total)) as pool:  # on Ctrl-C: terminated
            for n, result in enumerate(pool.imap_unordered(_process, jobs, chunksize=chunk), 1):
                done[result.index] = result
                if progress:
                    progress(n, total)
    return [d for d in done if d is not None]


@dataclass
class _Scan:
    tree: RawTree
    records: list[ImageRecord]
    images: list[np.ndarray | None]  # aligned with records
    bad: list[BadFile]


def _scan(
    raw_dir: Path,
    data: Any,
    *,
    resize: bool,
    workers: int | None,
    progress: Progress | None,
) -> _Scan:
    tree = scan_raw(raw_dir)
    limits = DecodeLimits.from_settings(data)
    raws: list[RawImage] = tree.images
    jobs = [
        _Job(
            index=i,
            path=str(r.path),
            name=f"'{r.relpath}'",
            size=int(data.image_size) if resize else None,
            resize=check_resize(data.resize),
            max_pixels=limits.max_pixels,
            max_bytes=limits.max_bytes,
        )
        for i, r in enumerate(raws)
    ]
    results = _run_jobs(jobs, workers, progress)
    records, images, bad = [], [], []
    for raw, res in zip(raws, results, strict=True):
        if res.error is not None:
            bad.append(
                BadFile(path=raw.relpath, split=raw.split, label=raw.label, reason=res.error)
            )
            continue
        records.append(
            ImageRecord(
                path=raw.relpath,
                split=raw.split,
                label=raw.label,
                pixel_hash=res.pixel_hash,
                dhash=res.dhash,
                width=res.width,
                height=res.height,
                mode=res.mode,
                format=res.format,
                file_bytes=res.file_bytes,
                thumb=res.thumb,
            )
        )
        images.append(res.image)
    return _Scan(tree=tree, records=records, images=images, bad=bad)


def _ignored(tree: RawTree) -> list[tuple[str, str]]:
    out = []
    for path, why in tree.ignored:
        try:
            rel = path.relative_to(tree.raw_dir).as_posix()
        except ValueError:
            rel = str(path)
        out.append((rel, why))
    return out


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise DataError(
            f"data.{name} '{value}' is not one of {', '.join(allowed)}.",
            f"set data.{name} to one of {', '.join(allowed)}.",
        )
    return value


def _raise_bad_files(bad: Sequence[BadFile]) -> None:
    shown = "; ".join(b.reason.rstrip(".") for b in bad[:10])
    more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
    raise DataError(
        f"{len(bad)} raw file(s) cannot be used: {shown}{more}.",
        "fix or remove them (`dvc pull` restores tracked files), or pass --on-bad-file skip "
        "(data.on_bad_file=skip) to leave them out; they are then listed in audit.json.",
    )


def mean_std(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of uint8 pixels in 0..1 units (exact, via a histogram)."""
    flat = images.reshape(-1)
    hist = np.zeros(256, dtype=np.float64)
    step = 1 << 22  # bincount makes an int64 copy: keep it to 32 MB at a time
    for start in range(0, flat.size, step):
        hist += np.bincount(flat[start : start + step], minlength=256)
    if hist.sum() == 0:
        raise DataError("cannot compute mean/std: the train split has no images.")
    values = np.arange(256, dtype=np.float64) / 255.0
    p = hist / hist.sum()
    mean = float((p * values).sum())
    std = float(np.sqrt(max((p * (values - mean) ** 2).sum(), 0.0)))
    return mean, std if std > 0 else 1.0


@dataclass
class PreprocessResult:
    """What `run_preprocess` made: where the store is, the audit, kept images per split, time."""

    store_dir: Path
    report: AuditReport
    counts: dict[str, int]
    seconds: float
    spec: PreprocessSpec | None = None


def _split_arrays(
    scan: _Scan, kept: Sequence[ImageRecord], why: str, raw_dir: Path
) -> dict[str, Split]:
    """The kept images of each split as arrays; a split left empty is a DataError (`why`)."""
    kept_ids = {id(r) for r in kept}
    image_of = {id(r): img for r, img in zip(scan.records, scan.images, strict=True)}
    arrays: dict[str, Split] = {}
    for split in SPLITS:
        rows = [r for r in scan.records if r.split == split and id(r) in kept_ids]
        if not rows:
            raise DataError(
                f"split '{split}' has no usable images left {why}.",
                f"check the raw folder '{raw_dir / split}' (`ctscan audit` lists the problems).",
            )
        images = np.stack([image_of[id(r)] for r in rows])[:, None]  # (N, 1, S, S) uint8
        arrays[split] = Split(
            images=np.ascontiguousarray(images, dtype=np.uint8),
            labels=np.array([CLASS_NAMES.index(r.label) for r in rows], dtype=np.int64),
            paths=[r.path for r in rows],
            hashes=[r.pixel_hash for r in rows],
        )
    return arrays


def _spec(data: Any, train_images: np.ndarray) -> PreprocessSpec:
    """The preprocessing spec of a new store: the data settings and the train split's mean/std."""
    mean, std = mean_std(train_images)
    return PreprocessSpec(
        image_size=int(data.image_size),
        resize=data.resize,
        mean=mean,
        std=std,
        class_names=CLASS_NAMES,
    )


def run_preprocess(
    settings: Any,
    raw_dir: Path | str | None = None,
    out_dir: Path | str | None = None,
    *,
    on_bad_file: str | None = None,
    progress: Progress | None = None,
    workers: int | None = None,
    force: bool = False,
) -> PreprocessResult:
    """Build the processed store from the raw images (see the module docstring).

    `settings`: a `Settings` (its `data` and `paths` sections are used). `raw_dir` / `out_dir`
    default to paths.raw_dir / paths.processed_dir; `on_bad_file` overrides data.on_bad_file.
    `progress(done, total)` is called after each image. `workers`: processes (default: all
    cores; 0 or 1 = in this process). A store at `out_dir` built with other data settings is
    replaced only with `force`; one built with the same settings is rebuilt.
    """
    start = time.perf_counter()
    data = settings.data
    raw_dir = Path(raw_dir if raw_dir is not None else settings.paths.raw_dir)
    out_dir = Path(out_dir if out_dir is not None else settings.paths.processed_dir)
    on_bad = _check_choice("on_bad_file", on_bad_file or data.on_bad_file, ("error", "skip"))
    on_leak = _check_choice("on_leak", data.on_leak, ("keep", "drop"))
    check_store_target(out_dir, data=data, force=force)  # fails now, not after the scan
    # One preprocess per store at a time: the settings check and the swap under one lock.
    lock = {"what": "folder of the processed store", "name": f".{out_dir.name}.lock"}
    with folder_lock(out_dir.parent, error=DataError, **lock):
        check_store_target(out_dir, data=data, force=force)  # again: another may have written it
        scan = _scan(raw_dir, data, resize=True, workers=workers, progress=progress)
        if scan.bad and on_bad == "error":
            _raise_bad_files(scan.bad)
        report = audit(
            scan.records,
            bad_files=scan.bad,
            ignored=_ignored(scan.tree),
            near_duplicate_distance=int(data.near_duplicate_distance),
            raw_dir=str(raw_dir),
        )
        kept, dropped = leak_policy(scan.records, on_leak, report.near_duplicates)
        report.on_leak, report.dropped = on_leak, dropped
        arrays = _split_arrays(
            scan,
            kept,
            f"({len(scan.bad)} bad file(s) skipped, {len(dropped)} "
            f"image(s) dropped by on_leak={on_leak})",
            raw_dir,
        )
        report.kept_counts = {
            s: {c: int((a.labels == i).sum()) for i, c in enumerate(CLASS_NAMES)}
            for s, a in arrays.items()
        }
        spec = _spec(data, arrays["train"].images)
        data_dict = {**data.model_dump(mode="json"), "on_bad_file": on_bad}
        store_dir = write_store(
            out_dir,
            arrays,
            spec=spec,
            data_settings=data_dict,
            raw_dir=raw_dir,
            raw_fingerprint=raw_fingerprint(scan.tree.images),
            dvc_md5=find_dvc_hash(raw_dir),
            on_leak=on_leak,
            dropped=[d.to_dict() for d in dropped],
            skipped=[b.to_dict() for b in scan.bad],
            audit=report.to_dict(),
            reference=build_reference(arrays["train"].images),  # drift monitoring (serve)
        )
        return PreprocessResult(
            store_dir=store_dir,
            report=report,
            counts={s: len(a.paths) for s, a in arrays.items()},
            seconds=time.perf_counter() - start,
            spec=spec,
        )


def run_audit(
    settings: Any,
    raw_dir: Path | str | None = None,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> AuditReport:
    """Audit the raw images without writing anything; bad files are listed, not raised.

    The report also shows what data.on_leak would drop.
    """
    data = settings.data
    raw_dir = Path(raw_dir if raw_dir is not None else settings.paths.raw_dir)
    scan = _scan(raw_dir, data, resize=False, workers=workers, progress=progress)
    return audit(
        scan.records,
        bad_files=scan.bad,
        ignored=_ignored(scan.tree),
        near_duplicate_distance=int(data.near_duplicate_distance),
        raw_dir=str(raw_dir),
        on_leak=_check_choice("on_leak", data.on_leak, ("keep", "drop")),
    )

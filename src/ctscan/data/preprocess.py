"""Raw images -> audited, leak-checked, resized uint8 tensors in the processed store.

`run_preprocess`: discover -> decode + gray + hashes + resize (a process pool) -> audit -> leak
policy -> mean/std and the drift reference of the train split -> write the store. `run_audit`
does the same without resizing or writing. Nothing is dropped silently: bad files are an error
or (on_bad_file="skip") listed in audit.json and meta.json, as are leak-policy drops.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
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
    pixel_hash,
    thumbnail,
)
from ctscan.data.raw import SPLITS, RawImage, RawTree, scan_raw
from ctscan.data.reference import build_reference
from ctscan.data.store import Split, check_store_target, find_dvc_hash, raw_fingerprint, write_store
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
POOL_MIN_IMAGES = 64  # below this a pool costs more than it saves
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


@dataclass(frozen=True)
class _Job:
    index: int
    raw: RawImage
    size: int | None  # None: audit only, no resize
    resize: str
    limits: DecodeLimits


@dataclass(frozen=True)
class _Done:
    index: int
    found: ImageRecord | BadFile
    image: np.ndarray | None = None  # (S, S) uint8


def _process(job: _Job) -> _Done:
    """Decode one file and compute everything preprocessing needs from it (runs in a worker)."""
    raw = job.raw
    try:
        with decode_image(raw.path, **asdict(job.limits), name=f"'{raw.relpath}'") as img:
            fmt, mode, (width, height) = img.format, img.mode, img.size
            gray = to_gray(img)
    except DataError as exc:
        return _Done(job.index, BadFile(raw.relpath, raw.split, raw.label, exc.message))
    record = ImageRecord(
        path=raw.relpath,
        split=raw.split,
        label=raw.label,
        pixel_hash=pixel_hash(gray),
        dhash=dhash64(gray),
        width=width,
        height=height,
        mode=mode,
        format=fmt,
        thumb=thumbnail(gray),
    )
    image = None if job.size is None else resize_square(gray, job.size, job.resize)
    return _Done(job.index, record, image)


def _init_worker(parent: int) -> None:
    """Pool workers leave Ctrl-C and SIGTERM to the parent and die with it: killed, it leaves
    none of them writing to its closed pipe (each a BrokenPipeError traceback)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not ctscan's handler, inherited by fork
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # held since the fork: acts now
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
    only let another thread take it and raise mid-start, leaking the workers.) The workers are
    forked with SIGTERM blocked until their initializer has set its default action: a terminate()
    that reached one before that ran ctscan's handler there, or was lost (CPython forgets the
    signals that arrive as it forks), and the parent waited for it for ever.
    """
    pool = None
    try:
        with critical():  # Ctrl-C and SIGTERM
            held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                pool = ctx.Pool(
                    processes=processes, initializer=_init_worker, initargs=(os.getpid(),)
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, held)
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        raise
    return pool


def _run_jobs(jobs: list[_Job], workers: int | None, progress: Progress | None) -> list[_Done]:
    total, workers = len(jobs), (os.cpu_count() or 1) if workers is None else workers
    serial = workers <= 1 or total < POOL_MIN_IMAGES
    # fork on Linux: workers start at once and need no `if __name__ == "__main__"` guard in the
    # caller; they run only PIL/numpy code, never torch. Elsewhere fork is unsafe.
    ctx = mp.get_context("fork" if sys.platform == "linux" else "spawn")
    done: list[_Done] = []
    with nullcontext() if serial else _start_pool(ctx, min(workers, total)) as pool:  # Ctrl-C
        chunk = max(1, total // (max(1, workers) * 8))
        for result in map(_process, jobs) if serial else pool.imap_unordered(_process, jobs, chunk):
            done.append(result)
            if progress:
                progress(len(done), total)
    return sorted(done, key=lambda d: d.index)


@dataclass
class _Scan:
    tree: RawTree
    records: list[ImageRecord]
    images: list[np.ndarray | None]  # aligned with records
    bad: list[BadFile]
    report: AuditReport


def _scan(
    raw_dir: Path, data: Any, *, resize: bool, workers: int | None, progress: Progress | None
) -> _Scan:
    """Decode every raw image (`resize`: also to data.image_size) and audit them."""
    tree = scan_raw(raw_dir)
    limits, policy = DecodeLimits.from_settings(data), check_resize(data.resize)
    size = int(data.image_size) if resize else None
    jobs = [_Job(i, raw, size, policy, limits) for i, raw in enumerate(tree.images)]
    done = _run_jobs(jobs, workers, progress)
    good = [d for d in done if isinstance(d.found, ImageRecord)]
    records, bad = [d.found for d in good], [d.found for d in done if isinstance(d.found, BadFile)]
    report = audit(
        records,
        bad_files=bad,
        ignored=[(p.relative_to(tree.raw_dir).as_posix(), why) for p, why in tree.ignored],
        near_duplicate_distance=int(data.near_duplicate_distance),
        raw_dir=str(raw_dir),
        on_leak=data.on_leak,
    )
    return _Scan(tree, records, [d.image for d in good], bad, report)


def mean_std(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of uint8 pixels in 0..1 units (exact, via a histogram)."""
    flat, step = images.reshape(-1), 1 << 22  # bincount makes an int64 copy: 32 MB at a time
    chunks = (np.bincount(flat[i : i + step], minlength=256) for i in range(0, flat.size, step))
    hist = sum(chunks, np.zeros(256, dtype=np.float64))
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
    spec: PreprocessSpec


def _kept_splits(scan: _Scan, data: Any, raw_dir: Path) -> dict[str, Split]:
    """The images data.on_leak keeps, per split (none left: a DataError)."""
    dropped = {d.path for d in scan.report.dropped}
    kept = [
        (r, im) for r, im in zip(scan.records, scan.images, strict=True) if r.path not in dropped
    ]
    splits: dict[str, Split] = {}
    for name in SPLITS:
        rows = [(r, image) for r, image in kept if r.split == name]
        if not rows:
            raise DataError(
                f"split '{name}' has no usable images left ({len(scan.bad)} bad file(s) skipped, "
                f"{len(dropped)} image(s) dropped by on_leak={data.on_leak}).",
                f"check the raw folder '{raw_dir / name}' (`ctscan audit` lists the problems).",
            )
        splits[name] = Split(
            images=np.stack([image for _, image in rows])[:, None],  # (N, 1, S, S) uint8
            labels=np.array([CLASS_NAMES.index(r.label) for r, _ in rows], dtype=np.int64),
            paths=[r.path for r, _ in rows],
            hashes=[r.pixel_hash for r, _ in rows],
        )
    return splits


def run_preprocess(
    settings: Any,
    raw_dir: Path | str | None = None,
    out_dir: Path | str | None = None,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
    force: bool = False,
) -> PreprocessResult:
    """Build the processed store from the raw images; `workers`: processes (default: all cores;
    0 or 1: this one); `force` replaces a store built with other data settings."""
    start = time.perf_counter()
    data = settings.data
    raw_dir = Path(raw_dir if raw_dir is not None else settings.paths.raw_dir)
    out_dir = Path(out_dir if out_dir is not None else settings.paths.processed_dir)
    check_store_target(out_dir, data=data, force=force)  # fails now, not after the scan
    # One preprocess per store at a time: the settings check and the swap under one lock.
    lock = {"what": "folder of the processed store", "name": f".{out_dir.name}.lock"}
    with folder_lock(out_dir.parent, error=DataError, **lock):
        check_store_target(out_dir, data=data, force=force)  # again: another may have written it
        scan = _scan(raw_dir, data, resize=True, workers=workers, progress=progress)
        if (bad := scan.bad) and data.on_bad_file == "error":
            more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
            raise DataError(
                f"{len(bad)} raw file(s) cannot be used: "
                f"{'; '.join(b.reason.rstrip('.') for b in bad[:10])}{more}.",
                "fix or remove them (`dvc pull` restores tracked files), or pass --on-bad-file "
                "skip (data.on_bad_file=skip) to leave them out; they are then listed in "
                "audit.json.",
            )
        report, splits = scan.report, _kept_splits(scan, data, raw_dir)
        mean, std = mean_std(splits["train"].images)
        spec = PreprocessSpec(int(data.image_size), data.resize, mean, std, CLASS_NAMES)
        store_dir = write_store(
            out_dir,
            splits,
            spec=spec,
            data_settings=data.model_dump(mode="json"),
            raw_dir=raw_dir,
            raw_fingerprint=raw_fingerprint(scan.tree.images),
            dvc_md5=find_dvc_hash(raw_dir),
            on_leak=data.on_leak,
            dropped=[d.to_dict() for d in report.dropped],
            skipped=[b.to_dict() for b in scan.bad],
            audit=report.to_dict(),
            reference=build_reference(splits["train"].images),  # drift monitoring (serve)
        )
    counts = {s: len(a) for s, a in splits.items()}
    return PreprocessResult(store_dir, report, counts, time.perf_counter() - start, spec)


def run_audit(
    settings: Any,
    raw_dir: Path | str | None = None,
    *,
    progress: Progress | None = None,
    workers: int | None = None,
) -> AuditReport:
    """Audit the raw images without writing anything; bad files are listed, not raised."""
    raw_dir = Path(raw_dir if raw_dir is not None else settings.paths.raw_dir)
    return _scan(raw_dir, settings.data, resize=False, workers=workers, progress=progress).report

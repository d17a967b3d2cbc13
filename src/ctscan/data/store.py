"""The processed store: one folder of `.npy` arrays plus JSON, written atomically.

Layout of `<processed_dir>/`:
    meta.json              spec, `data` settings, raw folder (absolute and relative to the
                           store), raw fingerprint, DVC md5, what was dropped/skipped, counts,
                           and the size + sha256 of every other file
    index.json             per split: `paths` (relative to the raw dir) and `pixel_hashes`
    audit.json             the audit report
    reference.json         the drift reference (data/reference.py)
    <split>_images.npy     (N, 1, S, S) uint8
    <split>_labels.npy     (N,) int64

It is built in a temp folder beside the target, fsynced, then renamed in (old store -> backup,
new -> target): a failure leaves the old store whole. The raw fingerprint (SHA-256 of every raw
image's `split/class/file` path and byte size) needs one `stat` per file and survives `dvc
checkout`; an edit that keeps the size is left to the pixel hashes and the DVC md5.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from shlex import quote
from typing import TYPE_CHECKING, Any

import numpy as np

import ctscan
from ctscan.data.raw import SPLITS, RawImage, discover
from ctscan.data.reference import REFERENCE_FILE, load_reference
from ctscan.data.transforms import PreprocessSpec
from ctscan.errors import DataError
from ctscan.files import file_sha256, folder_problem, fsync_dir
from ctscan.settings import given_args, is_given

if TYPE_CHECKING:
    import torch

STORE_FORMAT = 1
META_FILE = "meta.json"
INDEX_FILE = "index.json"
AUDIT_FILE = "audit.json"
PREPROCESS = "ctscan preprocess"


def rebuild_fix(command: str) -> str:
    """The fix of a missing, broken or outdated store: `command` builds it where it belongs."""
    return f"run `{command}` to rebuild the processed store."


STORE_FIX = (
    "choose another --out folder (paths.processed_dir): a new folder or an existing store, "
    "in a place you can write to."
)
# The `data` settings that change the stored tensors. The bad-file settings and
# near_duplicate_distance do not: what a store left out is listed in its meta.json.
TENSOR_KEYS: tuple[str, ...] = ("image_size", "resize", "on_leak")


@dataclass
class Split:
    """One split: numpy arrays on their way into the store, torch tensors read from it."""

    images: np.ndarray | torch.Tensor  # (N, 1, S, S) uint8
    labels: np.ndarray | torch.Tensor  # (N,) int64
    paths: list[str]
    hashes: list[str]

    def __len__(self) -> int:
        return len(self.paths)


def raw_fingerprint(source: Path | str | Sequence[RawImage]) -> str:
    """SHA-256 of the relative paths and byte sizes of the raw images (see the module doc)."""
    images = discover(source) if isinstance(source, (str, Path)) else list(source)
    rows = sorted((img.relpath, img.path.stat().st_size) for img in images)
    return hashlib.sha256("".join(f"{rel}\t{size}\n" for rel, size in rows).encode()).hexdigest()


_DVC_MD5 = re.compile(r"^\s*-?\s*md5:\s*([0-9a-f]{32}(?:\.dir)?)\s*$", re.MULTILINE)


def read_dvc_md5(dvc_file: Path | str) -> str | None:
    """The md5 a `.dvc` pointer file records for what it tracks, or None."""
    try:
        match = _DVC_MD5.search(Path(dvc_file).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return None
    return match.group(1) if match else None


def find_dvc_file(path: Path | str) -> Path | None:
    """The `.dvc` file tracking `path` (which need not exist) or a folder above it, or None."""
    here = Path(os.path.abspath(path))
    for folder in [here, *here.parents]:
        if folder.name and (folder.parent / f"{folder.name}.dvc").is_file():
            return folder.parent / f"{folder.name}.dvc"
    return None


def find_dvc_hash(raw_dir: Path | str) -> str | None:
    """The md5 recorded by the `.dvc` file that tracks `raw_dir` (see `find_dvc_file`), or None."""
    return read_dvc_md5(found) if (found := find_dvc_file(Path(raw_dir).resolve())) else None


def _write_file(path: Path, write: Any) -> None:
    with path.open("wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_json(path: Path, obj: Any) -> None:
    _write_file(path, lambda fh: fh.write(json.dumps(obj, indent=1).encode()))


def _read_meta(store_dir: Path) -> dict[str, Any] | None:
    """A store's meta.json, or None when it is absent or unreadable."""
    try:
        meta = json.loads((store_dir / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def _looks_like_store(path: Path) -> bool:
    try:
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            return True
    except OSError:
        return False
    return "store_format" in (_read_meta(path) or {})


def check_store_target(
    out_dir: Path | str, *, data: Mapping[str, Any] | Any | None = None, force: bool = False
) -> Path:
    """Make sure a store can be written at `out_dir`, or raise one DataError naming the path;
    one built with other TENSOR_KEYS than `data` is replaced only with `force`."""
    out_dir = Path(out_dir)
    what = f"processed store folder '{out_dir}'"
    if (problem := folder_problem(out_dir, create=False)) is not None:
        raise DataError(f"{what} {problem}.", STORE_FIX)
    if not _looks_like_store(out_dir):
        raise DataError(
            f"'{out_dir}' exists and is not a ctscan processed store; refusing to replace it.",
            "set paths.processed_dir (or --out) to a new folder or remove that one.",
        )
    meta = _read_meta(out_dir) if data is not None and not force else None
    if meta is not None and (stale := stale_keys(meta, data)):
        raise DataError(
            f"the processed store at '{out_dir}' was built with other settings ("
            f"{'; '.join(stale)}); refusing to replace it (the checkpoints trained on it read it).",
            f"write the new store elsewhere (--out {_free_folder(out_dir, _tag(stale, data))}), or "
            "pass --force to replace this one.",
        )
    if (problem := folder_problem(out_dir.parent)) is not None:  # the store appears by a rename
        raise DataError(f"{what} {problem}.", STORE_FIX)
    return out_dir


def _tag(stale: Sequence[str], data: Any) -> str:
    """The new values of the settings that differ (`64` for data.image_size=64)."""
    wanted = _as_dict(data)
    keys = [k for k in TENSOR_KEYS if any(line.startswith(f"data.{k}:") for line in stale)]
    return "-".join(str(wanted[k]) for k in keys if k in wanted) or "new"


def _free_folder(base: Path | str, tag: str) -> Path:
    """A folder beside `base` that does not exist yet: `outputs/processed-64` for tag 64."""
    base = Path(base)
    found, n = base.with_name(f"{base.name}-{tag}"), 2
    while found.exists():
        found, n = base.with_name(f"{base.name}-{tag}-{n}"), n + 1
    return found


def _replace_dir(new: Path, target: Path) -> None:
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        backup.rmdir()
        os.rename(target, backup)
        try:
            os.rename(new, target)
        except OSError:
            os.rename(backup, target)
            raise
        if backup.is_symlink():  # --force on a linked store: the link goes, its folder stays
            backup.unlink()
        else:
            shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(new, target)
    fsync_dir(target.parent)


def _shape_problem(split: Split, size: int, channels: int = 1) -> str | None:
    """What is wrong with the shapes and dtypes of a split's arrays, or None."""
    images, labels, n = split.images, split.labels, len(split)
    if (
        str(images.dtype).removeprefix("torch.") != "uint8"
        or tuple(images.shape) != (n, channels, size, size)
        or str(labels.dtype).removeprefix("torch.") != "int64"
        or tuple(labels.shape) != (n,)
        or len(split.hashes) != n
    ):
        return (
            f"images {images.dtype}{list(images.shape)}, labels {labels.dtype}"
            f"{list(labels.shape)} for {n} paths"
        )
    return None


def _write_payload(
    folder: Path, splits: Mapping[str, Split], json_files: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Write the arrays, index.json and the other JSON files; their sizes and sha256 by name."""
    for name, arr in splits.items():
        for kind, value in (("images", arr.images), ("labels", arr.labels)):
            _write_file(folder / f"{name}_{kind}.npy", lambda fh, v=value: np.save(fh, v))
    index = {n: {"paths": list(a.paths), "pixel_hashes": list(a.hashes)} for n, a in splits.items()}
    for fname, obj in {INDEX_FILE: index, **json_files}.items():
        if obj is not None:
            _write_json(folder / fname, obj)
    return {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(folder.iterdir())
    }


def write_store(
    out_dir: Path | str,
    splits: Mapping[str, Split],
    *,
    spec: PreprocessSpec,
    data_settings: Mapping[str, Any],
    raw_dir: Path | str | None,
    raw_fingerprint: str,
    dvc_md5: str | None = None,
    on_leak: str,
    dropped: Sequence[Mapping[str, Any]] = (),
    skipped: Sequence[Mapping[str, Any]] = (),
    audit: Mapping[str, Any] | None = None,
    reference: Mapping[str, Any] | None = None,
) -> Path:
    """Write the store atomically to `out_dir` (replacing an older store there) and return it."""
    out_dir = check_store_target(out_dir)
    for name, split in splits.items():
        if (problem := _shape_problem(split, spec.image_size)) is not None:
            raise ValueError(f"split '{name}' has {problem}")
    raw_abs = Path(raw_dir).resolve() if raw_dir is not None else None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    except OSError as exc:
        raise _write_failed(out_dir, exc) from None
    try:
        files = _write_payload(tmp, splits, {AUDIT_FILE: audit, REFERENCE_FILE: reference})
        meta = {
            "store_format": STORE_FORMAT,
            "ctscan_version": ctscan.__version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "spec": spec.to_dict(),
            "data": dict(data_settings),
            "raw_dir": str(raw_abs) if raw_abs is not None else None,
            "raw_dir_from_store": _relative(raw_abs, out_dir) if raw_abs is not None else None,
            "raw_fingerprint": raw_fingerprint,
            "dvc_md5": dvc_md5,
            "on_leak": on_leak,
            "counts": {name: len(arr) for name, arr in splits.items()},
            "class_counts": {
                name: {c: int((arr.labels == i).sum()) for i, c in enumerate(spec.class_names)}
                for name, arr in splits.items()
            },
            "dropped": [dict(d) for d in dropped],
            "skipped": [dict(s) for s in skipped],
            "files": files,
        }
        _write_json(tmp / META_FILE, meta)  # last: a store without meta.json is incomplete
        fsync_dir(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):  # disk full, permissions changed meanwhile, ...
            raise _write_failed(out_dir, exc) from None
        raise
    return out_dir


def _write_failed(out_dir: Path, exc: OSError) -> DataError:
    at = f" (at {exc.filename!r})" if exc.filename else ""
    return DataError(
        f"cannot write the processed store '{out_dir}': {exc.strerror or exc}{at}; the old "
        "store, if any, is kept.",
        "free disk space or " + STORE_FIX,
    )


def _relative(target: Path, store_dir: Path) -> str | None:
    try:
        return os.path.relpath(target, Path(store_dir).resolve())
    except ValueError:  # another drive (Windows)
        return None


class Store:
    """A processed store opened by `load_store`; `raw_check`: how `open_store` checked it
    against its raw folder: "verified", "raw folder not found: ..." or "not checked: ..."."""

    def __init__(self, path: Path, meta: dict[str, Any], index: dict[str, Any], fix: str) -> None:
        self.path, self.meta, self._index, self.rebuild_fix = path, meta, index, fix
        self._splits: dict[str, Split] = {}
        self.raw_check: str = "not checked: opened without the raw-image check"
        self.raw_dir: Path | None = None

    @property
    def raw_warning(self) -> str | None:
        """One line for stderr when the raw folder could not be checked, else None."""
        if not self.raw_check.startswith("raw folder not found"):
            return None
        return f"processed store '{self.path}' not checked against its raw images: {self.raw_check}"

    @property
    def spec(self) -> PreprocessSpec:
        """The preprocessing spec every consumer of this store must use."""
        return PreprocessSpec.from_dict(self.meta["spec"])

    @property
    def split_names(self) -> tuple[str, ...]:
        """The splits held, in the canonical order."""
        return tuple(sorted(self._index, key=lambda s: SPLITS.index(s) if s in SPLITS else 3))

    @property
    def counts(self) -> dict[str, int]:
        """Images per split."""
        return dict(self.meta["counts"])

    def audit(self) -> dict[str, Any] | None:
        """The audit report written with the store, as a dict (None if absent)."""
        path = self.path / AUDIT_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def reference(self) -> dict[str, Any] | None:
        """The drift reference written with the store (checked), or None if absent."""
        path = self.path / REFERENCE_FILE
        return load_reference(path) if path.is_file() else None

    def identities(self, name: str) -> tuple[list[str], list[str]]:
        """The paths and pixel hashes of one split, from the index (no image or label is read)."""
        if name not in self._index:
            raise DataError(
                f"split '{name}' is not in the store at '{self.path}' "
                f"(it has {', '.join(self.split_names)}).",
                "use one of those splits.",
            )
        return list(self._index[name]["paths"]), list(self._index[name]["pixel_hashes"])

    def split(self, name: str) -> Split:
        """The images, labels, paths and pixel hashes of one split (loaded once, then cached)."""
        import torch

        if name not in self._splits:
            paths, hashes = self.identities(name)  # an unknown split is refused here
            images, labels = (
                self._load_array(f"{name}_{kind}.npy") for kind in ("images", "labels")
            )
            split = Split(images, labels, paths, hashes)
            spec = self.spec
            if (problem := _shape_problem(split, spec.image_size, spec.channels)) is not None:
                raise DataError(
                    f"the store at '{self.path}' is inconsistent: split '{name}' has {problem}.",
                    self.rebuild_fix,
                )
            if len(split) and (labels.min() < 0 or labels.max() >= len(spec.class_names)):
                raise DataError(f"split '{name}' has labels out of range.", self.rebuild_fix)
            split.images, split.labels = torch.from_numpy(images), torch.from_numpy(labels)
            self._splits[name] = split
        return self._splits[name]

    def _load_array(self, fname: str) -> np.ndarray:
        try:
            return np.load(self.path / fname, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise DataError(
                f"cannot read '{self.path / fname}' of the processed store: {exc}.",
                self.rebuild_fix,
            ) from None


def _corrupt(store_dir: Path, what: str, fix: str) -> DataError:
    return DataError(f"the processed store at '{store_dir}' is corrupt or partial: {what}.", fix)


def _as_dict(data: Any) -> dict[str, Any]:
    return data.model_dump(mode="json") if hasattr(data, "model_dump") else dict(data)


def stale_keys(meta: Mapping[str, Any], expect_data: Mapping[str, Any] | Any) -> list[str]:
    """`data.<key>: store=<v> settings=<w>` for every TENSOR_KEYS setting that differs."""
    stored = meta.get("data", {})
    expected = _as_dict(expect_data)
    return [
        f"data.{k}: store={stored.get(k)!r} settings={expected[k]!r}"
        for k in TENSOR_KEYS
        if k in expected and stored.get(k) != expected[k]
    ]


def check_raw(store_dir: Path, meta: Mapping[str, Any], command: str) -> tuple[str, Path | None]:
    """Check a store against its raw folder: ("verified", folder) or (why not checked, None);
    a DataError when the raw folder is found and its images changed."""
    if not meta.get("raw_dir"):
        return "not checked: the store records no raw folder", None
    candidates = [Path(meta["raw_dir"])]  # the absolute path recorded, then relative to the store
    if meta.get("raw_dir_from_store"):
        candidates.append(Path(os.path.normpath(store_dir.resolve() / meta["raw_dir_from_store"])))
    for folder in dict.fromkeys(candidates):
        if folder.is_dir():
            try:
                fingerprint = raw_fingerprint(folder)
            except DataError as exc:
                raise DataError(
                    f"the raw folder '{folder}' the processed store at '{store_dir}' was built "
                    f"from cannot be checked: {exc.message}",
                    f"restore the raw images (`dvc pull`) or run `{command}` to rebuild the store.",
                ) from None
            if meta["raw_fingerprint"] != fingerprint:
                raise DataError(
                    f"the raw images changed since the processed store at '{store_dir}' was "
                    f"built (raw folder '{folder}', raw fingerprint "
                    f"{meta['raw_fingerprint'][:12]} != {fingerprint[:12]}).",
                    rebuild_fix(command),
                )
            return "verified", folder
    note = f"raw folder not found: '{candidates[0]}'"
    found = [(f, md5) for f in map(find_dvc_file, candidates) if f and (md5 := read_dvc_md5(f))]
    if found:
        (dvc_file, md5), stored_md5 = found[0], meta.get("dvc_md5")
        if stored_md5 == md5:
            note += f"; '{dvc_file}' records the data version the store was built from ({md5})"
        else:
            note += (
                f"; '{dvc_file}' records another data version ({md5}; the store was built "
                f"from {stored_md5 or 'an unrecorded version'}): `dvc pull`, then "
                "`ctscan preprocess`"
            )
    return note, None


def _read_store_json(store_dir: Path, fix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """meta.json and index.json of a store, refusing a missing, unreadable or foreign one."""
    try:
        meta = json.loads((store_dir / META_FILE).read_text())
        index = json.loads((store_dir / INDEX_FILE).read_text())
    except FileNotFoundError as exc:
        raise _corrupt(store_dir, f"'{Path(exc.filename).name}' is missing", fix) from None
    except (OSError, ValueError) as exc:
        raise _corrupt(store_dir, f"its JSON cannot be read ({exc})", fix) from None
    if not isinstance(meta, dict) or meta.get("store_format") != STORE_FORMAT:
        found = meta.get("store_format") if isinstance(meta, dict) else None
        raise DataError(
            f"the processed store at '{store_dir}' has format {found!r}, this ctscan reads "
            f"format {STORE_FORMAT}.",
            fix,
        )
    for key in ("spec", "data", "counts", "files", "raw_fingerprint"):
        if key not in meta:
            raise _corrupt(store_dir, f"meta.json lacks '{key}'", fix)
    return meta, index


def _check_files(store_dir: Path, files: Mapping[str, Any], verify: bool, fix: str) -> None:
    """Every file meta.json lists is there, with its size (and with `verify`, its sha256)."""
    for fname, info in files.items():
        path = store_dir / fname
        if not path.is_file():
            raise _corrupt(store_dir, f"'{fname}' is missing", fix)
        if (size := path.stat().st_size) != info["bytes"]:
            raise _corrupt(store_dir, f"'{fname}' has {size} bytes, expected {info['bytes']}", fix)
        if verify and file_sha256(path) != info["sha256"]:
            raise _corrupt(store_dir, f"'{fname}' does not match its sha256", fix)


def load_store(
    store_dir: Path | str,
    *,
    expect_data: Mapping[str, Any] | Any | None = None,
    verify: bool = True,
    command: str = PREPROCESS,
) -> Store:
    """Open a processed store, refusing a missing, corrupt, partial or stale one (TENSOR_KEYS
    of `expect_data`); `command`: the preprocess command named in every fix."""
    store_dir = Path(store_dir)
    fix = rebuild_fix(command)
    if not store_dir.is_dir():
        leftovers = sorted(store_dir.parent.glob(f".{store_dir.name}.old-*"))
        hint = f" (an interrupted write left '{leftovers[0]}')" if leftovers else ""
        raise DataError(f"no processed store at '{store_dir}'{hint}.", f"run `{command}`.")
    meta, index = _read_store_json(store_dir, fix)
    _check_files(store_dir, meta["files"], verify, fix)
    if expect_data is not None and (stale := stale_keys(meta, expect_data)):
        # never "rebuild it": that would take the store from the runs trained on it
        new = _free_folder(store_dir, _tag(stale, expect_data))
        raise DataError(
            f"the processed store at '{store_dir}' was built with other settings: "
            f"{'; '.join(stale)}.",
            f"change the settings back, or give these settings a store of their own: "
            f"`{command} --out {new}`, then add `--set paths.processed_dir={new}` here.",
        )
    PreprocessSpec.from_dict(meta["spec"])  # refuse a bad spec now, not at first use
    return Store(store_dir, meta, index, fix)


def open_store(
    processed_dir: Path | str,
    *,
    expect_data: Mapping[str, Any] | Any | None,
    command: str = PREPROCESS,
) -> Store:
    """`load_store`, then `check_raw`; a copy without its raw images opens (`raw_warning`)."""
    store = load_store(processed_dir, expect_data=expect_data, command=command)
    store.raw_check, store.raw_dir = check_raw(store.path, store.meta, command)
    return store


def open_settings_store(settings: Any) -> Store:
    """The store `settings` name, checked against their `data` (fixes keep the user's -s)."""
    command = f"{PREPROCESS} {given_args(settings)}".strip()
    return open_store(settings.paths.processed_dir, expect_data=settings.data, command=command)


def open_model_store(settings: Any, model: Any) -> Store:
    """The store holding images as `model` (a Checkpoint) takes them.

    `paths.processed_dir` when the user names it; else the first matching store that opens
    among the model's own `paths.processed_dir`, the default store, and their `NAME-*` siblings.
    None: a DataError whose fix builds a matching store without replacing any other.
    """
    trained = model.settings or {}
    data = trained.get("data") or {}
    own = _found_above((trained.get("paths") or {}).get("processed_dir"), model)
    chosen = Path(settings.paths.processed_dir)
    named = is_given(settings, "paths.processed_dir")
    bases = [*own, chosen]
    siblings = [s for b in bases for s in sorted(b.parent.glob(f"{b.name}-*")) if s.is_dir()]
    pool = _unique([*bases, *siblings])
    candidates, firsts = [chosen] if named else pool, [*own[:1], chosen]
    problems: dict[Path, str] = {}
    broken: DataError | None = None
    for path in candidates:
        named_by = " (its run's paths.processed_dir)" if path in own[:1] else ""
        if (problem := _store_mismatch(path, model.spec, data, f"'{path}'{named_by}")) is None:
            try:
                return open_store(path, expect_data=None, command=_build(model, path))
            except DataError as exc:  # corrupt, partial, raw images changed: try the next one
                broken = broken or exc
        elif path.is_dir() or path in firsts:
            problems.setdefault(path.resolve(), problem)
    if broken is not None:
        raise broken
    readable = [p for p in pool if _read_meta(p) is not None]
    match = next((p for p in readable if _store_mismatch(p, model.spec, data) is None), None)
    raise DataError(
        f"checkpoint '{model.source}' takes images preprocessed as {_describe(model.spec)}, "
        f"but {'; '.join(problems.values())}.",
        _model_store_fix(model, own, chosen, match),
    )


def _found_above(recorded: str | None, model: Any) -> list[Path]:
    """A path a checkpoint records: as given, then under each folder above its sources."""
    if not recorded:
        return []
    path = Path(recorded)
    if path.is_absolute():
        return [path]
    return _unique([path, *[f / path for s in _sources(model) for f in Path(s).resolve().parents]])


def _sources(model: Any) -> list[str]:
    return [s for s in [model.source, *[m.get("source") for m in model.members or []]] if s]


def _unique(paths: Sequence[Path]) -> list[Path]:
    """`paths` without those naming a folder named before (the first spelling is kept)."""
    seen: dict[Path, Path] = {}
    for path in paths:
        seen.setdefault(path.resolve(), path)
    return list(seen.values())


def _store_mismatch(
    path: Path, spec: PreprocessSpec, data: Mapping[str, Any], what: str = ""
) -> str | None:
    """Why the store at `path` lacks `spec` + `data` images (None: it has them or is unreadable)."""
    if not path.is_dir():
        return f"no processed store is at {what}"
    meta = _read_meta(path)
    try:
        held = PreprocessSpec.from_dict(meta["spec"])
    except (DataError, KeyError, TypeError):  # no meta.json (None) or a broken spec
        return None
    if held != spec:
        return f"the store at {what} holds {_describe(held)}"
    stale = stale_keys(meta, data)
    return f"the store at {what} was built with {'; '.join(stale)}" if stale else None


def _describe(spec: PreprocessSpec) -> str:
    return f"{spec.image_size} px, resize {spec.resize}, mean {spec.mean:.6g}, std {spec.std:.6g}"


def _build(model: Any, out: Path) -> str:
    """The preprocess command, with absolute paths, that builds the model's store at `out`."""
    spec, trained = model.spec, model.settings or {}
    data = trained.get("data") or {}
    runs = [Path(s).parent / "settings.toml" for s in _sources(model)]
    if (run := next((f.resolve() for f in runs if f.is_file()), None)) is not None:
        command = f"{PREPROCESS} -s {quote(str(run))}"
        raws = _found_above((trained.get("paths") or {}).get("raw_dir"), model)
        raw = next((p for p in raws if p.is_dir()), None)
        if raw is not None and not raws[0].is_absolute():  # recorded relative to its project
            command += f" --set paths.raw_dir={quote(str(raw.resolve()))}"
    else:
        command = (
            f"{PREPROCESS} --set data.image_size={spec.image_size} --set data.resize={spec.resize}"
            + (f" --set data.on_leak={data['on_leak']}" if "on_leak" in data else "")
        )
    return f"{command} --out {quote(str(out.resolve()))}"


def _model_store_fix(model: Any, own: list[Path], chosen: Path, match: Path | None) -> str:
    """Use a store that matches the model, or build one where no store is."""
    if match is not None:
        where = quote(str(match.resolve()))
        return f"use a store that holds its images: pass `--set paths.processed_dir={where}`."
    taken = next((p for p in own if p.exists()), None if own else chosen)
    target = _free_folder(taken, f"{model.spec.image_size}") if taken else own[0]
    then = f"--set paths.processed_dir={quote(str(target.resolve()))}"
    return (
        f"build its store where no other store is: `{_build(model, target)}`, then run this "
        f"again with `{then}`."
    )

"""Rich rendering of results for the command line: the data layer and the engine return data."""

from __future__ import annotations

import contextlib
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.markup import escape  # paths may hold [brackets]
from rich.progress import Progress
from rich.table import Table

from ctscan import CLASS_NAMES
from ctscan.data.audit import SAME_PICTURE_MAD, AuditReport, DroppedImage
from ctscan.engine.metrics import ECE_TARGET

if TYPE_CHECKING:
    from ctscan.ops.export import ExportResult


def _table(title: str, columns: Sequence[str], *, left: int = 1, **options: Any) -> Any:
    """A Rich table: the first `left` columns aligned left, the others (numbers) right."""
    table = Table(title=title, **options)
    for i, name in enumerate(columns):
        table.add_column(name, justify="left" if i < left else "right")
    return table


def _examples(items: Sequence[str], n: int = 3) -> str:
    return escape(", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else ""))


def _short(path: str) -> str:
    """`split/long class folder/file` -> `split:file` (the class folders are long)."""
    parts = path.split("/")
    return f"{parts[0]}:{parts[-1]}" if len(parts) >= 3 else path


def _group_text(paths: Sequence[str], labels: Sequence[str]) -> str:
    shown = " = ".join(_short(p) for p in paths[:3]) + (" = ..." if len(paths) > 3 else "")
    return f"{shown} ({' vs '.join(labels)})" if len(labels) > 1 else shown


def _kinds(dropped: Sequence[DroppedImage]) -> str:
    by = Counter(f"{d.split} {d.kind}" for d in dropped)
    return ", ".join(f"{k}: {v}" for k, v in sorted(by.items())) or "-"


def render_summary(report: AuditReport) -> Any:
    """Rich tables for the CLI: counts per split and class, file properties, findings."""
    return Group(_counts_table(report), _files_table(report), _findings_table(report))


def _counts_table(report: AuditReport) -> Any:
    classes = list(dict.fromkeys([*CLASS_NAMES, *(c for s in report.counts.values() for c in s)]))
    counts = _table("Images per split and class", ["split", *classes, "total"])
    for split, per_class in report.counts.items():  # "kept (-dropped)" where on_leak dropped
        kept = per_class if report.kept_counts is None else report.kept_counts.get(split, {})
        pairs = [(per_class.get(name, 0), kept.get(name, 0)) for name in classes]
        pairs.append((sum(per_class.values()), sum(kept.values())))
        counts.add_row(split, *(f"{k} (-{n - k})" if k != n else str(n) for n, k in pairs))
    return counts


def _files_table(report: AuditReport) -> Any:
    files = _table("Files", ["property", "values"], left=2)
    files.add_row("modes", ", ".join(f"{k}: {v}" for k, v in report.modes.items()))
    files.add_row("formats", ", ".join(f"{k}: {v}" for k, v in report.formats.items()))
    if r := report.size_range:
        files.add_row(
            "sizes",
            f"{len(report.sizes)} distinct, width {r['min_width']}..{r['max_width']}, height "
            f"{r['min_height']}..{r['max_height']}; most common: "
            + ", ".join(f"{k} ({v})" for k, v in list(report.sizes.items())[:3]),
        )
    if report.suffix_mismatches:
        files.add_row(
            "format != suffix",
            _examples([f"{m['path']} is {m['format']}" for m in report.suffix_mismatches]),
        )
    return files


def _findings_table(report: AuditReport) -> Any:
    findings = _table(
        "Findings",
        ["finding", "count"],
        caption="every list in full: `ctscan audit --json`, or audit.json in the store",
    )
    findings.add_column("example")
    findings.add_row(
        "bad files", str(len(report.bad_files)), _examples([b.reason for b in report.bad_files], 1)
    )
    findings.add_row(
        "ignored files",
        str(len(report.ignored_files)),
        _examples([f["path"] for f in report.ignored_files], 2),
    )
    dup_files = sum(len(g.paths) for g in report.exact_duplicates)
    for title, groups, count in (
        ("exact duplicate groups", report.exact_duplicates, f"({dup_files} files)"),
        ("cross-split groups (leak)", report.cross_split_duplicates, ""),
        ("label conflicts", report.label_conflicts, ""),
    ):
        findings.add_row(
            title,
            f"{len(groups)} {count}".strip(),
            _examples([_group_text(g.paths, g.labels) for g in groups], 1),
        )
    copies = [n for n in report.near_duplicates if n.same_picture]
    findings.add_row(
        f"near copies (dHash <= {report.near_duplicate_distance}, thumbnail diff <= "
        f"{SAME_PICTURE_MAD:g})",
        f"{len(copies)} ({sum(len(n.splits) > 1 for n in copies)} cross-split)",
        _examples([f"{_short(n.a[0])} ~ {_short(n.b[0])}" for n in copies], 1),
    )
    others = [n for n in report.near_duplicates if not n.same_picture]
    findings.add_row(
        "other near-duplicate candidates (review)",
        str(len(others)),
        _examples([f"{_short(n.a[0])} ~ {_short(n.b[0])} ({n.distance})" for n in others], 1),
    )
    if report.on_leak == "drop":
        findings.add_row("dropped (on_leak=drop)", str(len(report.dropped)), _kinds(report.dropped))
    elif report.drop_preview is not None:
        findings.add_row(
            f"on_leak=drop would drop (now {report.on_leak or 'not applied'})",
            str(len(report.drop_preview)),
            _kinds(report.drop_preview),
        )
    return findings


def _ece_rows(
    debiased: Sequence[dict[str, Any] | None], floors: Sequence[dict[str, Any] | None] = ()
) -> list[list[str]]:
    """Table rows under the ECE, one column per value ('-' where None): what a perfectly
    calibrated model would read here (`ece_floor` dicts; no row without them), then the
    debiased estimate (`ece_debiased`, engine/metrics.py), its 95 % interval and its verdict."""
    said = {True: "met", False: "missed", None: "cannot tell"}
    shown = {
        "  ece debiased": lambda v: f"{v['estimate']:.4f}",
        "  its 95% interval": lambda v: f"{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}",
        f"  {ECE_TARGET:g} target by it": lambda v: said[v["meets_target"]],
    }
    rows = [[name, *(show(v) if v else "-" for v in debiased)] for name, show in shown.items()]
    if floors:
        floor = (f"{f['median']:.4f}, {f['p95']:.4f}" if f else "-" for f in floors)
        rows.insert(0, ["  ece if calibrated (median, p95)", *floor])
    return rows


def _number(value: Any) -> str:
    return "-" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


def render_report(result: dict[str, Any]) -> Any:
    """Rich tables: summary, per-class metrics and the confusion matrix."""
    title = f"{result['model_name']} on {result['split']} ({result['n']} images)"
    pair = [result, result.get("leak_free") or {}]
    summary = _table(title, ["metric", "all", f"leak-free (-{result['leak_free_excluded']})"])
    for key in ("accuracy", "balanced_accuracy", "macro_f1", "weighted_f1", "macro_roc_auc", "ece"):
        summary.add_row(key, *(_number(r.get(key)) for r in pair))
    for row in _ece_rows(*([r.get(key) for r in pair] for key in ("ece_debiased", "ece_floor"))):
        summary.add_row(*row)
    summary.add_row("log_loss", *(_number(r.get("log_loss")) for r in pair))
    columns = ["precision", "recall", "f1", "support"]
    per_class = _table("per class", ["class", *columns])
    for name, row in result["per_class"].items():
        per_class.add_row(name, *(_number(row[k]) for k in columns))
    names = result["class_names"]
    cm = _table("confusion matrix (rows: true, columns: predicted)", ["", *(n[:12] for n in names)])
    for name, row in zip(names, result["confusion_matrix"], strict=True):
        cm.add_row(name, *(str(v) for v in row))
    parts: list[Any] = [summary, per_class, cm]
    if result.get("calibration"):
        parts.append(_calibration_effect(result["calibration"], result["split"]))
    if result.get("outputs"):
        parts.append(f"report files: {result['outputs']}")
    return Group(*parts)


def _calibration_effect(calibration: dict[str, Any], split: str) -> Any:
    """A Rich table: ECE and log-loss of the split before (T = 1) and after the temperature."""
    note = "accuracy and F1 do not depend on T (the argmax is unchanged)"
    if calibration.get("fitted_on_this_split"):
        note = f"T was fitted on {split}: 'after' is optimistic here; judge it on test"
    elif not calibration.get("fit_attempted") and calibration.get("ensemble"):
        note = "its members are calibrated one by one (a fold model's T is out of fold)"
    elif not calibration.get("fit_attempted"):
        note = "`ctscan calibrate CHECKPOINT` fits T on the validation split"
    after = f"after (T = {calibration['temperature']:.4g})"
    table = _table(
        f"calibration on {split}",
        ["metric", "before (T = 1)", after],
        caption=f"{escape(str(calibration['text']))}; {note}",
        title_justify="left",
    )
    before_after = [calibration[k] for k in ("before", "after")]
    table.add_row("ece", *(f"{m['ece']:.4f}" for m in before_after))
    for row in _ece_rows([m["ece_debiased"] for m in before_after]):
        table.add_row(*row)
    table.add_row("log_loss", *(f"{m['log_loss']:.4f}" for m in before_after))
    return table


def render_calibration(result: dict[str, Any]) -> Any:
    """A Rich table for `ctscan calibrate`: the temperature and the validation metrics it moved."""
    report = result["calibration"]
    notes = [str(report["note"])] if report.get("note") else []
    if result["previous_temperature"] != 1.0:
        notes.append(f"the checkpoint held T = {result['previous_temperature']:.4g} before")
    table = _table(
        f"{report['split']}: {report['n']} images, {report['status']}",
        ["", "T = 1", f"T = {result['temperature']:.4g}"],
        caption=escape("; ".join(notes)) or None,
        title_justify="left",
    )
    for key in ("ece", "log_loss"):  # log_loss is the NLL that T minimises
        before, after = report.get(f"{key}_before"), report.get(f"{key}_after")
        if before is None or after is None:
            continue
        table.add_row(key, f"{before:.4f}", f"{after:.4f}")
        if key == "ece":
            floors = [report.get("ece_floor_before"), report.get("ece_floor_after")]
            debiased = [report.get("ece_debiased_before"), report.get("ece_debiased_after")]
            for row in _ece_rows(debiased, floors if all(floors) else ()):
                table.add_row(*row)
    return table


def render_parity(result: ExportResult) -> Any:
    """A Rich table: each format's max |logit difference| vs eager, agreement and accuracy."""
    opset = f", ONNX opset {result.opset}" if result.opset else ""
    table = _table(
        f"{result.model_name}: parity with the eager checkpoint on {result.n_test} test "
        f"images{opset}",
        ["format", "file", "max |Δlogit|", "agreement", "accuracy"],
        left=2,
        title_justify="left",
    )
    table.add_column("status")
    for i, column in enumerate(table.columns):  # figures whole, file names folded, not cut
        column.no_wrap, column.overflow = 2 <= i <= 4, "fold"
    for row in result.parity:
        status = "reference" if row.format == "eager" else ("ok" if row.accepted else row.note)
        diff = "-" if row.format == "eager" else f"{row.max_abs_diff:.2e}"
        rates = (f"{row.agreement:.2%}", f"{row.accuracy:.2%}")
        table.add_row(row.format, escape(row.path.name), diff, *rates, escape(status))
    return table


def render_predictions(predictions: Sequence[Any], predictor: Any) -> Any:
    """A Rich table: one row per input with its label, confidence and class probabilities."""
    info = predictor.info
    names = list(predictor.class_names)
    table = _table(
        f"{info.name} ({info.format}, {info.backend} {info.precision}) sha256 {info.sha256[:12]}, "
        f"{escape(info.calibration)}",
        ["file", "label", "confidence", *(name[:12] for name in names)],
        left=2,
        caption="probabilities per class (softmax(logits / T)); failed files give the reason",
    )
    table.columns[0].overflow = "fold"
    for p in predictions:
        if p.error is not None:
            table.add_row(escape(str(p.path)), "[red]error[/red]", "", escape(p.error))
            continue
        probs = p.probabilities or {}
        table.add_row(
            escape(str(p.path)), p.label, f"{p.confidence:.3f}", *(f"{probs[n]:.3f}" for n in names)
        )
    return table


@contextlib.contextmanager
def progress_bar(total: int, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A Rich progress bar on stderr (none when disabled or not a terminal); yields `advance(n)`."""
    shown = enabled and sys.stderr.isatty()
    with Progress(console=Console(stderr=True), transient=True, disable=not shown) as bar:
        task = bar.add_task("predict", total=total)
        yield lambda n: bar.update(task, advance=n)


def render_profile(summary: dict[str, Any], rows: int = 10) -> Any:
    """A Rich table of the top operators by self CPU time (and self CUDA time on CUDA)."""
    cuda = summary["device"].startswith("cuda")
    table = _table(
        f"{summary['model']} on {summary['device']}: top operators by self CPU time",
        ["operator", "calls", "self CPU ms", *(["self CUDA ms"] if cuda else []), "CPU MiB"],
        title_justify="left",
    )
    table.columns[0].overflow = "fold"
    for op in summary["top_ops"][:rows]:
        ms = [f"{op[key]:.2f}" for key in ("self_cpu_ms", "self_cuda_ms")[: 1 + cuda]]
        table.add_row(escape(op["name"]), str(op["calls"]), *ms, f"{op['cpu_memory_mb']:.1f}")
    return table


def render_sweep(summary: dict[str, Any]) -> Any:
    """A Rich table of a sweep's trials: state, parameters, metric, epochs, seconds; best marked."""
    metric, keys = summary["metric"], summary["param_keys"]
    best = (summary.get("best") or {}).get("number")
    counts = ", ".join(f"{n} {state}" for state, n in sorted(summary["counts"].items()))
    table = _table(
        f"sweep {escape(summary['study'])}: {counts or 'no trials'} "
        f"(wanted {summary['trials_wanted']} finished; {metric}, {summary['direction']})",
        ["#", "state", *(escape(key) for key in keys), metric, "epochs", "seconds"],
        left=0,
        caption=escape(f"study {summary['optuna_storage']}; runs {summary['sweep_folder']}"),
        title_justify="left",
    )
    table.columns[1].justify = "left"
    table.add_column("note", overflow="fold")
    for row in summary["trials"]:
        params = [row["params"].get(key) for key in keys]
        cells = [
            str(row["number"]) + (" *" if row["number"] == best else ""),
            row["state"].lower(),
            *("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in params),
            "" if row["value"] is None else f"{row['value']:.4f}",
            str(row["epochs"]),
            "" if row["seconds"] is None else f"{row['seconds']:.1f}",
            escape(row["note"]),
        ]
        style = (
            "dim" if row["state"] != "COMPLETE" else "bold green" if row["number"] == best else None
        )
        table.add_row(*cells, style=style)
    return table

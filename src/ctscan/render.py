"""Rich rendering of results for the command line: the data layer and the engine return data."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ctscan import CLASS_NAMES
from ctscan.data.audit import SAME_PICTURE_MAD, AuditReport, DroppedImage

if TYPE_CHECKING:
    from ctscan.ops.export import ExportResult


def _examples(items: Sequence[str], n: int = 3) -> str:
    from rich.markup import escape  # paths may hold [brackets]

    shown = ", ".join(items[:n])
    return escape(shown + (f" (+{len(items) - n} more)" if len(items) > n else ""))


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
    from rich.console import Group

    return Group(_counts_table(report), _files_table(report), _findings_table(report))


def _counts_table(report: AuditReport) -> Any:
    from rich.table import Table

    counts = Table(title="Images per split and class")
    counts.add_column("split")
    classes = list(CLASS_NAMES) + [
        c for s in report.counts.values() for c in s if c not in CLASS_NAMES
    ]
    for name in classes:
        counts.add_column(name, justify="right")
    counts.add_column("total", justify="right")
    for split, per_class in report.counts.items():
        kept = (report.kept_counts or {}).get(split, {})
        cells = []
        for name in [*classes, "total"]:
            n = sum(per_class.values()) if name == "total" else per_class.get(name, 0)
            if report.kept_counts is not None:
                k = sum(kept.values()) if name == "total" else kept.get(name, 0)
                cells.append(f"{k} (-{n - k})" if k != n else str(n))
            else:
                cells.append(str(n))
        counts.add_row(split, *cells)
    return counts


def _files_table(report: AuditReport) -> Any:
    from rich.table import Table

    files = Table(title="Files")
    files.add_column("property")
    files.add_column("values")
    files.add_row("modes", ", ".join(f"{k}: {v}" for k, v in report.modes.items()))
    files.add_row("formats", ", ".join(f"{k}: {v}" for k, v in report.formats.items()))
    if report.size_range:
        r = report.size_range
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
    from rich.table import Table

    findings = Table(
        title="Findings",
        caption="every list in full: `ctscan audit --json`, or audit.json in the store",
    )
    findings.add_column("finding")
    findings.add_column("count", justify="right")
    findings.add_column("example")
    findings.add_row(
        "bad files",
        str(len(report.bad_files)),
        _examples([b.reason for b in report.bad_files], 1),
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


def _debiased_rows(values: Sequence[dict[str, Any] | None]) -> list[list[str]]:
    """Table rows of `ece_debiased` dicts (engine/metrics.py), one column each: the estimate,
    its 95 % interval and what the interval says of the target ('-' where None)."""
    from ctscan.engine.metrics import ECE_TARGET

    said = {True: "met", False: "missed", None: "cannot tell"}
    return [
        ["  ece debiased", *(f"{v['estimate']:.4f}" if v else "-" for v in values)],
        [
            "  its 95% interval",
            *(f"{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}" if v else "-" for v in values),
        ],
        [
            f"  {ECE_TARGET:g} target by it",
            *(said[v["meets_target"]] if v else "-" for v in values),
        ],
    ]


def render_report(result: dict[str, Any]) -> Any:
    """Rich tables: summary, per-class metrics and the confusion matrix."""
    from rich.console import Group
    from rich.table import Table

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)

    def floor(metrics: dict[str, Any]) -> str:
        value = metrics.get("ece_floor")
        return "-" if not value else f"{value['median']:.4f}, {value['p95']:.4f}"

    summary = Table(title=f"{result['model_name']} on {result['split']} ({result['n']} images)")
    summary.add_column("metric")
    summary.add_column("all", justify="right")
    summary.add_column(f"leak-free (-{result['leak_free_excluded']})", justify="right")
    lf = result.get("leak_free") or {}
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "weighted_f1",
        "macro_roc_auc",
        "ece",
        "log_loss",
    ):
        summary.add_row(key, fmt(result.get(key)), fmt(lf.get(key)))
        if key == "ece":  # what a perfectly calibrated model would read on this many images
            summary.add_row("  ece if calibrated (median, p95)", floor(result), floor(lf))
            for row in _debiased_rows([result.get("ece_debiased"), lf.get("ece_debiased")]):
                summary.add_row(*row)
    per_class = Table(title="per class")
    for col in ("class", "precision", "recall", "f1", "support"):
        per_class.add_column(col, justify="left" if col == "class" else "right")
    for name, row in result["per_class"].items():
        per_class.add_row(
            name, fmt(row["precision"]), fmt(row["recall"]), fmt(row["f1"]), str(row["support"])
        )
    names = result["class_names"]
    cm = Table(title="confusion matrix (rows: true, columns: predicted)")
    cm.add_column("")
    for name in names:
        cm.add_column(name[:12], justify="right")
    for name, row in zip(names, result["confusion_matrix"], strict=True):
        cm.add_row(name, *(str(v) for v in row))
    parts: list[Any] = [summary, per_class, cm]
    if result.get("calibration"):
        parts.append(render_calibration_effect(result["calibration"], result["split"]))
    if result.get("outputs"):
        parts.append(f"report files: {result['outputs']}")
    return Group(*parts)


def render_calibration_effect(calibration: dict[str, Any], split: str) -> Any:
    """A Rich table: ECE and log-loss of the split before (T = 1) and after the temperature."""
    from rich.markup import escape
    from rich.table import Table

    note = "accuracy and F1 do not depend on T (the argmax is unchanged)"
    if calibration.get("fitted_on_this_split"):
        note = f"T was fitted on {split}: 'after' is optimistic here; judge it on test"
    elif not calibration.get("fit_attempted") and calibration.get("ensemble"):
        note = "its members are calibrated one by one (a fold model's T is out of fold)"
    elif not calibration.get("fit_attempted"):
        note = "`ctscan calibrate CHECKPOINT` fits T on the validation split"
    table = Table(
        title=f"calibration on {split}",
        caption=f"{escape(str(calibration['text']))}; {note}",
        title_justify="left",
    )
    table.add_column("metric")
    table.add_column("before (T = 1)", justify="right")
    table.add_column(f"after (T = {calibration['temperature']:.4g})", justify="right")
    for key in ("ece", "log_loss"):
        table.add_row(key, f"{calibration['before'][key]:.4f}", f"{calibration['after'][key]:.4f}")
        if key == "ece":
            for row in _debiased_rows(
                [calibration[k]["ece_debiased"] for k in ("before", "after")]
            ):
                table.add_row(*row)
    return table


def render_calibration(result: dict[str, Any]) -> Any:
    """A Rich table for `ctscan calibrate`: the temperature and the validation metrics it moved."""
    from rich.markup import escape
    from rich.table import Table

    report = result["calibration"]
    notes = [str(report["note"])] if report.get("note") else []
    if result["previous_temperature"] != 1.0:
        notes.append(f"the checkpoint held T = {result['previous_temperature']:.4g} before")
    table = Table(
        title=f"{report['split']}: {report['n']} images, {report['status']}",
        caption=escape("; ".join(notes)) or None,
        title_justify="left",
    )
    table.add_column("")
    table.add_column("T = 1", justify="right")
    table.add_column(f"T = {result['temperature']:.4g}", justify="right")
    for key in ("ece", "log_loss"):  # log_loss is the NLL that T minimises
        before, after = report.get(f"{key}_before"), report.get(f"{key}_after")
        if before is None or after is None:
            continue
        table.add_row(key, f"{before:.4f}", f"{after:.4f}")
        floors = report.get("ece_floor_before"), report.get("ece_floor_after")
        if key == "ece" and all(floors):  # what a perfectly calibrated model would read here
            table.add_row(
                "  ece if calibrated (median, p95)",
                *(f"{f['median']:.4f}, {f['p95']:.4f}" for f in floors if f),
            )
        if key == "ece":
            debiased = [report.get("ece_debiased_before"), report.get("ece_debiased_after")]
            for row in _debiased_rows(debiased):
                table.add_row(*row)
    return table


def render_parity(result: ExportResult) -> Any:
    """A Rich table: each format's max |logit difference| vs eager, agreement and accuracy."""
    from rich.markup import escape
    from rich.table import Table

    opset = f", ONNX opset {result.opset}" if result.opset else ""
    table = Table(
        title=f"{result.model_name}: parity with the eager checkpoint on {result.n_test} test "
        f"images{opset}",
        title_justify="left",
    )
    table.add_column("format", no_wrap=True)
    table.add_column("file", no_wrap=True)
    table.add_column("max |Δlogit|", justify="right")
    table.add_column("agreement", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("status")
    for row in result.parity:
        status = "reference" if row.format == "eager" else ("ok" if row.accepted else row.note)
        table.add_row(
            row.format,
            escape(row.path.name),
            "-" if row.format == "eager" else f"{row.max_abs_diff:.2e}",
            f"{row.agreement:.2%}",
            f"{row.accuracy:.2%}",
            escape(status),
        )
    return table


def render_predictions(predictions: Sequence[Any], predictor: Any) -> Any:
    """A Rich table: one row per input with its label, confidence and class probabilities."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    info = predictor.info
    names = list(predictor.class_names)
    table = Table(
        title=f"{info.name} ({info.format}, {info.backend}) sha256 {info.sha256[:12]}, "
        f"{escape(info.calibration)}",
        caption="probabilities per class (softmax(logits / T)); failed files give the reason",
    )
    table.add_column("file", overflow="fold")
    table.add_column("label")
    table.add_column("confidence", justify="right")
    for name in names:
        table.add_column(name[:12], justify="right")
    for p in predictions:
        if p.error is not None:
            table.add_row(escape(str(p.path)), "[red]error[/red]", "", escape(p.error))
            continue
        probs = p.probabilities or {}
        table.add_row(
            escape(str(p.path)),
            p.label,
            f"{p.confidence:.3f}",
            *(f"{probs[n]:.3f}" for n in names),
        )
    return Group(table)


class ProgressBar:
    """A Rich progress bar on stderr for many files (nothing when disabled or not a terminal)."""

    def __init__(self, total: int, *, enabled: bool) -> None:
        import sys

        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> ProgressBar:
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress

            self._bar = Progress(console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task("predict", total=self.total)
        return self

    def advance(self, n: int) -> None:
        """`n` more files done."""
        if self._bar is not None:
            self._bar.update(self._task, advance=n)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def render_profile(summary: dict[str, Any], rows: int = 10) -> Any:
    """A Rich table of the top operators by self CPU time (and self CUDA time on CUDA)."""
    from rich.markup import escape
    from rich.table import Table

    cuda = summary["device"].startswith("cuda")
    table = Table(
        title=f"{summary['model']} on {summary['device']}: top operators by self CPU time",
        title_justify="left",
    )
    table.add_column("operator", overflow="fold")
    table.add_column("calls", justify="right")
    table.add_column("self CPU ms", justify="right")
    if cuda:
        table.add_column("self CUDA ms", justify="right")
    table.add_column("CPU MiB", justify="right")
    for op in summary["top_ops"][:rows]:
        cells = [escape(op["name"]), str(op["calls"]), f"{op['self_cpu_ms']:.2f}"]
        if cuda:
            cells.append(f"{op['self_cuda_ms']:.2f}")
        cells.append(f"{op['cpu_memory_mb']:.1f}")
        table.add_row(*cells)
    return table


def render_sweep(summary: dict[str, Any]) -> Any:
    """A Rich table of a sweep's trials: state, parameters, metric, epochs, seconds; best marked."""
    from rich.markup import escape
    from rich.table import Table

    metric, keys = summary["metric"], summary["param_keys"]
    best = (summary.get("best") or {}).get("number")
    counts = ", ".join(f"{n} {state}" for state, n in sorted(summary["counts"].items()))
    table = Table(
        title=f"sweep {escape(summary['study'])}: {counts or 'no trials'} "
        f"(wanted {summary['trials_wanted']} finished; {metric}, {summary['direction']})",
        caption=escape(f"study {summary['optuna_storage']}; runs {summary['sweep_folder']}"),
        title_justify="left",
    )
    table.add_column("#", justify="right")
    table.add_column("state")
    for key in keys:
        table.add_column(escape(key), justify="right")
    table.add_column(metric, justify="right")
    table.add_column("epochs", justify="right")
    table.add_column("seconds", justify="right")
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
        style = "bold green" if row["number"] == best else None
        if row["state"] != "COMPLETE":
            style = "dim"
        table.add_row(*cells, style=style)
    return table

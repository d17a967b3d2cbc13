"""The `ctscan` command line: thin Typer commands over plain functions.

Only typer and the standard library are imported at module level, so `ctscan --help` starts fast;
each command imports what it needs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from ctscan import __version__
from ctscan.errors import CtscanError, debug_enabled, report, say_line

app = typer.Typer(
    name="ctscan",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
settings_app = typer.Typer(help="Inspect the resolved settings.", no_args_is_help=True)
app.add_typer(settings_app, name="settings")

# Shared options, defined once.
SettingsFiles = Annotated[
    list[str] | None,
    typer.Option(
        "--settings",
        "-s",
        help="TOML settings file or recipe name in settings/ (repeatable; later files win).",
    ),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one setting, e.g. --set train.lr=3e-4 (repeatable; beats env and files).",
    ),
]
RawDir = Annotated[Path | None, typer.Argument(help="Raw Kaggle folder (default: paths.raw_dir).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Plain log lines, no live display.")]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda.")]
ResultJson = Annotated[bool, typer.Option("--json", help="The result as JSON on stdout.")]


def _checkpoint_file(path: Path) -> Path:
    """A missing or folder CHECKPOINT is said at once, not after torch's import (2.7 s)."""
    from ctscan.files import model_file

    return model_file(path)


Checkpoint = Annotated[
    Path,
    typer.Argument(help="Checkpoint file (.pt) written by train.", callback=_checkpoint_file),
]
ModelName = Annotated[
    str | None, typer.Option(help="cnn | cnn_gap | resnet18 | efficientnet_lite0.")
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctscan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    """Train, check and serve chest-CT slice classifiers."""


# command flags named otherwise than their settings key (the others are --<key>, _ as -)
FLAG_NAMES = {"model.name": "--model", "paths.processed_dir": "--out", "paths.raw_dir": "RAW_DIR"}


def _settings(
    files: list[str] | None, overrides: list[str] | None, **sections: dict[str, Any]
) -> Any:  # -> Settings
    """Resolve settings; explicit command flags (not None), by settings section (e.g.
    `train={"epochs": epochs}`), beat --set, env and files."""
    from ctscan.settings import load_settings, toml_value

    flags = {f"{name}.{key}": v for name, keys in sections.items() for key, v in keys.items()}
    given = {key: value for key, value in flags.items() if value is not None}
    extra = [f"{key}={toml_value(value)}" for key, value in given.items()]
    origins = {
        key: FLAG_NAMES.get(key, "--" + key.rpartition(".")[2].replace("_", "-")) for key in given
    }
    return load_settings(files or [], [*(overrides or []), *extra], origins=origins)


def _console(stderr: bool = True) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


def _emit(data: Any, as_json: bool, *shown: Any, warnings: Sequence[str] = ()) -> None:
    """Warnings on stderr as plain lines, then on stdout `data` as JSON, or else each of
    `shown` (a Rich renderable, or a string echoed as is: paths must not be wrapped)."""
    for warning in warnings:
        _console().print(f"warning: {warning}", markup=False, highlight=False)
    for item in [json.dumps(data, indent=2)] if as_json else shown:
        if isinstance(item, str):
            typer.echo(item)
        else:
            _console(stderr=False).print(item)


@settings_app.command("show")
def settings_show(
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of TOML.")] = False,
) -> None:
    """Print the fully resolved settings (defaults < files < env < --set)."""
    from ctscan.settings import public_dict, to_toml

    settings = _settings(settings_files, overrides)
    _emit(public_dict(settings), as_json, to_toml(settings).removesuffix("\n"))


@app.command()
def preprocess(
    raw_dir: RawDir = None,
    out: Annotated[
        Path | None, typer.Option(help="Store folder (default: paths.processed_dir).")
    ] = None,
    on_bad_file: Annotated[
        str | None,
        typer.Option(
            help="error | skip (skipped files are listed in the audit and the store's meta.json;"
            " train and evaluate need no matching setting)."
        ),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace a store built with other data settings at --out (the runs trained on "
            "it lose their data); a store of the same settings is rebuilt without it.",
        ),
    ] = False,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
    quiet: Quiet = False,
) -> None:
    """Audit the raw images and write the processed uint8 store."""
    from ctscan.data.preprocess import run_preprocess
    from ctscan.render import render_summary

    paths = {"raw_dir": raw_dir, "processed_dir": out}
    settings = _settings(settings_files, overrides, paths=paths, data={"on_bad_file": on_bad_file})
    result = run_preprocess(settings, force=force)
    console = _console()
    if not quiet:
        console.print(render_summary(result.report))
    console.print(
        f"[green]store written[/green] {result.store_dir} "
        f"({', '.join(f'{k} {v}' for k, v in result.counts.items())}; {result.seconds:.1f} s)"
    )
    if result.report.bad_files:
        console.print(
            f"[yellow]{len(result.report.bad_files)} bad file(s) skipped[/yellow]: listed in "
            f"{result.store_dir / 'meta.json'} and audit.json"
        )


@app.command()
def audit(
    raw_dir: RawDir = None,
    as_json: ResultJson = False,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
) -> None:
    """Audit the raw images (counts, sizes, bad files, duplicates, leaks); writes no store."""
    from ctscan.data.preprocess import run_audit
    from ctscan.render import render_summary

    audit_report = run_audit(_settings(settings_files, overrides, paths={"raw_dir": raw_dir}))
    _emit(audit_report.to_dict(), as_json, render_summary(audit_report))


@app.command()
def train(
    model: ModelName = None,
    device: Device = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Run folder (default: paths.runs_dir/<model>-s<seed>-<time>)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="'auto' (last.pt in --out, or the newest run of this model and seed) or a "
            "last.pt path; the run's settings must match (-s RUN/settings.toml)."
        ),
    ] = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
    quiet: Annotated[
        bool | None, typer.Option("--quiet/--no-quiet", "-q", help="Plain log lines.")
    ] = None,
    folds: Annotated[
        int | None,
        typer.Option(
            help="Cross-validate: K models on K folds of train + valid (copies never straddle "
            "folds), selected and calibrated out of fold, test read once at the end. --out "
            "names the folder; the same command with it continues an interrupted run."
        ),
    ] = None,
) -> None:
    """Train a model on the processed store; evaluate the best checkpoint on test."""
    flags = {"device": device, "epochs": epochs, "seed": seed, "quiet": quiet}
    settings = _settings(settings_files, overrides, model={"name": model}, train=flags)
    if folds is not None and resume is not None:
        raise CtscanError(
            "--resume does not apply to --folds: a cross-validation continues in its folder.",
            "rerun the same command with --out CV_FOLDER (its finished folds are kept).",
        )
    from ctscan.engine.train import run_training  # torch: after the checks, so a typo fails fast

    if folds is None:
        result = run_training(settings, out_dir=out, resume=resume)
    else:
        from ctscan.ops.cv import cv_lines, run_cv

        result = run_cv(settings, folds, out_dir=out, say=say_line)
        for line in cv_lines(result):
            say_line(line)
    if result is not None:
        typer.echo(json.dumps(result.summary(), indent=2))


@app.command()
def evaluate(
    checkpoint: Checkpoint,
    split: Annotated[str, typer.Option(help="test | valid | train.")] = "test",
    as_json: ResultJson = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the report files (default: eval-<split>/ beside the checkpoint)."
        ),
    ] = None,
    device: Device = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
) -> None:
    """Evaluate a checkpoint on a split: metrics, confusion matrix, calibration, worst errors."""
    settings = _settings(settings_files, overrides, train={"device": device})
    from ctscan.engine.evaluate import run_evaluation
    from ctscan.render import render_report

    result = run_evaluation(settings, checkpoint, split=split, out_dir=out)
    _emit(result, as_json, render_report(result), warnings=result["warnings"])


@app.command()
def calibrate(
    checkpoint: Checkpoint,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Write the calibrated checkpoint here (default: rewrite CHECKPOINT in place)."
        ),
    ] = None,
    as_json: ResultJson = False,
    device: Device = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
) -> None:
    """Fit a checkpoint's temperature on the validation split (never test) and store it in it."""
    settings = _settings(settings_files, overrides, train={"device": device})
    from ctscan.engine.calibration import run_calibrate
    from ctscan.render import render_calibration

    result = run_calibrate(settings, checkpoint, out=out)
    shown = (render_calibration(result), result["checkpoint"])
    _emit(result, as_json, *shown, warnings=result["warnings"])


@app.command()
def ensemble(
    members: Annotated[
        list[Path],
        typer.Argument(
            help="Checkpoints (.pt), run folders (their best.pt) or a `train --folds K` folder "
            "(its fold models)."
        ),
    ],
    out: Annotated[Path, typer.Option(help="The ensemble checkpoint to write (.pt, a new file).")],
    tta: Annotated[
        list[str] | None,
        typer.Option(
            help="Test-time views averaged with the image itself: hflip, vflip (repeatable)."
        ),
    ] = None,
    as_json: ResultJson = False,
    device: Device = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
) -> None:
    """Average several checkpoints (and flipped views) into one checkpoint any command takes."""
    settings = _settings(settings_files, overrides, train={"device": device})
    from ctscan.ops.ensemble import build_ensemble

    result = build_ensemble(settings, members, out=out, flips=tuple(tta or ()))
    _emit(result.to_dict(), as_json, str(result.checkpoint), warnings=result.warnings)
    if not as_json:
        views = " + ".join(("image", *result.flips))
        each = ", ".join(f"{m['model_name']} (T {m['temperature']:.3g})" for m in result.members)
        typer.echo(f"{len(result.members)} member(s) x {views}: {each}", err=True)


@app.command()
def predict(
    paths: Annotated[
        list[Path],
        typer.Argument(
            help="Image files or folders (searched recursively): PNG, JPEG, BMP, TIFF, WebP, DICOM."
        ),
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "-m",
            help="A checkpoint (.pt), an ONNX file from `ctscan export` (.onnx) or an MLflow "
            "model URI (models:/ctscan-classifier@champion, runs:/<id>/model).",
        ),
    ],
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per input on stdout (JSON lines).")
    ] = False,
    csv_file: Annotated[
        Path | None, typer.Option("--csv", help="Also write the predictions to this CSV file.")
    ] = None,
    explain: Annotated[
        Path | None, typer.Option(help="Write a Grad-CAM overlay PNG per image into this folder.")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="auto | onnx | openvino | torch. auto: a checkpoint runs on its ONNX export "
            "(made once, checked against it and cached in paths.runs_dir/serve-cache) on ONNX "
            "Runtime, torch with --explain; openvino: that export, or the .onnx file, on OpenVINO."
        ),
    ] = "auto",
    device: Device = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
    quiet: Quiet = False,
) -> None:
    """Predict the class of CT slices with a trained model; exit 3 if any file failed."""
    from ctscan.files import atomic_write, ensure_dir
    from ctscan.inference.batch import as_json_rows, collect_inputs, predictions_csv, run_predict
    from ctscan.ops.backends import open_model
    from ctscan.render import progress_bar, render_predictions

    settings = _settings(settings_files, overrides, train={"device": device})
    if explain is not None and backend == "auto":
        backend = "torch"  # Grad-CAM needs the PyTorch model's gradients
    predictor = open_model(model, settings, backend)
    files = collect_inputs(paths)
    with progress_bar(len(files), enabled=not quiet and not as_json and len(files) > 1) as advance:
        predictions = run_predict(predictor, files, explain_dir=explain, progress=advance)
    if csv_file is not None:
        if csv_file.is_dir():
            raise CtscanError(
                f"--csv file '{csv_file}' is a folder.", "name a file for --csv file."
            )
        ensure_dir(csv_file.parent, what="folder of the --csv file")
        atomic_write(csv_file, predictions_csv(predictions, predictor.class_names))
    if as_json:
        for row in as_json_rows(predictions, predictor.info.to_dict()):
            typer.echo(json.dumps(row))
    else:
        _console(stderr=False).print(render_predictions(predictions, predictor))
    if failed := sum(p.error is not None for p in predictions):
        _console().print(f"{failed} of {len(predictions)} files could not be predicted")
        raise typer.Exit(3)


@app.command()
def serve(
    model: Annotated[
        str,
        typer.Argument(
            help="A checkpoint (.pt), an ONNX file (.onnx) or an MLflow model URI "
            "(models:/ctscan-classifier@champion)."
        ),
    ],
    host: Annotated[str | None, typer.Option(help="Address to bind (default: serve.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default: serve.port).")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes, each with the model (default: 1).")
    ] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="auto | torch | onnx | openvino (default: auto, ONNX Runtime when it can)."
        ),
    ] = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
) -> None:
    """Serve the model over HTTP: /predict, /explain, KServe v2, /metrics and a web page."""
    from ctscan.serve.server import run_server

    flags = {"host": host, "port": port, "workers": workers, "backend": backend}
    run_server(model, _settings(settings_files, overrides, serve=flags))


@app.command()
def profile(
    model: ModelName = None,
    device: Device = None,
    steps: Annotated[
        int,
        typer.Option(
            min=1, help="Training steps to record, after 1 wait and 1 warmup step (2 on CUDA)."
        ),
    ] = 5,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Folder for trace.json.gz, tensorboard/, top_ops.txt and summary.json "
            "(default: paths.runs_dir/profile-<model>-<time>)."
        ),
    ] = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
) -> None:
    """Profile training steps with torch.profiler: a Perfetto trace, top operators, a summary."""
    settings = _settings(settings_files, overrides, model={"name": model}, train={"device": device})
    from ctscan.ops.profile import run_profile, split_line
    from ctscan.render import render_profile

    result = run_profile(settings, steps=steps, out_dir=out)
    console = _console()
    console.print(render_profile(result.summary))
    console.print(split_line(result.summary), highlight=False, soft_wrap=True)
    typer.echo(str(result.out_dir))


@app.command()
def export(
    checkpoint: Checkpoint,
    format_: Annotated[
        str, typer.Option("--format", help="onnx | pt2 | all (all: onnx and pt2).")
    ] = "onnx",
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help="Also write a static int8 ONNX model (<name>.int8.onnx), kept only if it agrees "
            "with the checkpoint on >= 98% of the test images and loses <= 1 point of accuracy.",
        ),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            help="The file for one format, a folder for all (default: beside the checkpoint: "
            "best.onnx, best.int8.onnx, best.pt2)."
        ),
    ] = None,
    triton: Annotated[
        Path | None,
        typer.Option(
            help="Also lay out a Triton model repository here: <name>/1/model.onnx, "
            "config.pbtxt, labels.txt."
        ),
    ] = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
) -> None:
    """Export a checkpoint to ONNX (fp32, int8) or .pt2, checked against it on the test split."""
    settings = _settings(settings_files, overrides)
    from ctscan.ops.export import run_export
    from ctscan.render import render_parity

    result = run_export(settings, checkpoint, fmt=format_, int8=int8, out=out, triton_dir=triton)
    shown = (render_parity(result), *(str(path) for path in result.paths))
    _emit(None, False, *shown, warnings=result.warnings)
    if result.error is not None:
        raise result.error


@app.command()
def sweep(
    spec: Annotated[
        Path,
        typer.Argument(
            help="Sweep spec (TOML): the settings to search, the metric, base settings "
            "(docs/sweep.md); or its name in settings/sweeps/."
        ),
    ],
    trials: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Finished trials the study should hold; a rerun continues up to it "
            "(default: the spec's trials).",
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Study name (default: the spec file's name).")
    ] = None,
    recipe: Annotated[
        Path | None,
        typer.Option(
            help="Where to write the best trial's settings "
            "(default: paths.runs_dir/sweeps/NAME/best.toml)."
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="The Optuna study's database: sqlite:///PATH, or a PostgreSQL URL "
            "(postgresql+psycopg://USER@HOST/DB) that sweeps on many machines join "
            "(default: paths.runs_dir/optuna.db)."
        ),
    ] = None,
    overrides: Overrides = None,
    as_json: ResultJson = False,
) -> None:
    """Search settings with Optuna (TPE, median pruning), one training per trial; write the best."""
    from ctscan.ops.sweep import run_sweep
    from ctscan.render import render_sweep

    result = run_sweep(
        spec, trials=trials, name=name, recipe=recipe, storage=storage, overrides=overrides or []
    )
    if as_json:
        typer.echo(json.dumps(result.summary(), indent=2))
    else:
        _console().print(render_sweep(result.summary()))
        if result.recipe is not None:
            typer.echo(str(result.recipe))
    if result.error is not None:
        raise result.error


def _interrupt_in(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind an exception (Typer turns Ctrl-C into `Exit(130)`)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, KeyboardInterrupt):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def main() -> None:
    """Console-script entry point: user errors and interrupts become one line and an exit code.

    Exit codes: 0 ok, 1 other user error, 2 settings, 3 data, 4 checkpoint, 130 Ctrl-C,
    143 SIGTERM; a traceback only for bugs (or with CTSCAN_DEBUG=1).
    """
    from ctscan.errors import Interrupted
    from ctscan.jobs import exit_stopped, ignore_stops, install_stop_handlers, stop_received

    install_stop_handlers()  # every command unwinds (and cleans up) on a stop (done already by
    # ctscan.__main__.main, the `ctscan` script's entry, before this module's imports)
    try:
        app()
    except CtscanError as error:
        if debug_enabled():
            raise
        if isinstance(error, Interrupted):
            ignore_stops()
        sys.exit(report(error))
    except (KeyboardInterrupt, SystemExit) as exc:
        if (interrupt := _interrupt_in(exc)) is not None:
            exit_stopped(interrupt, "")
        if stop_received() is not None and getattr(exc, "code", None) in (0, None):
            exit_stopped(
                None,
                " (it landed where it could not act; the command had done its work)",
                again=False,
            )
        raise
    except Exception:
        # A stop that landed where it was swallowed (e.g. mid-import: a half-imported module)
        # surfaces as another error: it is reported as the stop, not as a bug.
        if stop_received() is None or debug_enabled():
            raise
        exit_stopped(
            None, " (while starting or stopping; CTSCAN_DEBUG=1 shows the error it caused)"
        )

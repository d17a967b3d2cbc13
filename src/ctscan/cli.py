"""The `ctscan` command line: thin Typer commands over plain functions.

Only typer and the standard library are imported at module level, so `ctscan --help` starts fast;
each command imports what it needs.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from ctscan import __version__
from ctscan.errors import CtscanError, debug_enabled, report

app = typer.Typer(
    name="ctscan",
    help="Train, check and serve chest-CT slice classifiers.",
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
        show_default=False,
    ),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override one setting, e.g. --set train.lr=3e-4 (repeatable; beats env and files).",
        show_default=False,
    ),
]
RawDir = Annotated[Path | None, typer.Argument(help="Raw Kaggle folder (default: paths.raw_dir).")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Plain log lines, no live display.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ctscan {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Show the version."),
    ] = False,
) -> None:
    """ctscan: chest-CT slice classification, from raw images to evaluated models."""


def _settings(
    files: list[str] | None, overrides: list[str] | None, **flags: Any
) -> Any:  # -> Settings
    """Resolve settings; explicit command flags (not None) beat --set, env and files."""
    from ctscan.settings import load_settings, toml_value

    extra = [f"{key}={toml_value(value)}" for key, value in flags.items() if value is not None]
    return load_settings(files or [], [*(overrides or []), *extra])


def _console(stderr: bool = True) -> Any:
    from rich.console import Console

    return Console(stderr=stderr)


@settings_app.command("show")
def settings_show(
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of TOML.")] = False,
) -> None:
    """Print the fully resolved settings (defaults < files < env < --set)."""
    from ctscan.settings import to_toml

    settings = _settings(settings_files, overrides)
    if as_json:
        typer.echo(settings.model_dump_json(indent=2))
    else:
        typer.echo(to_toml(settings), nl=False)


@app.command()
def preprocess(
    raw_dir: RawDir = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Store folder (default: paths.processed_dir).")
    ] = None,
    on_bad_file: Annotated[
        str | None, typer.Option(help="error | skip (skipped files are listed in the audit).")
    ] = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
    quiet: Quiet = False,
) -> None:
    """Audit the raw images and write the processed uint8 store."""
    from ctscan.data.preprocess import run_preprocess
    from ctscan.render import render_summary

    settings = _settings(
        settings_files,
        overrides,
        **{"paths.raw_dir": raw_dir, "paths.processed_dir": out, "data.on_bad_file": on_bad_file},
    )
    result = run_preprocess(settings)
    console = _console()
    if not quiet:
        console.print(render_summary(result.report))
    console.print(
        f"[green]store written[/green] {result.store_dir} "
        f"({', '.join(f'{k} {v}' for k, v in result.counts.items())}; {result.seconds:.1f} s)"
    )


@app.command()
def audit(
    raw_dir: RawDir = None,
    as_json: Annotated[bool, typer.Option("--json", help="The audit as JSON on stdout.")] = False,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
) -> None:
    """Audit the raw images (counts, sizes, bad files, duplicates, leaks); writes no store."""
    from ctscan.data.preprocess import run_audit
    from ctscan.render import render_summary

    settings = _settings(
        settings_files,
        overrides,
        **{"paths.raw_dir": raw_dir},
    )
    report_ = run_audit(settings)
    if as_json:
        typer.echo(json.dumps(report_.to_dict(), indent=2))
    else:
        _console(stderr=False).print(render_summary(report_))


@app.command()
def train(
    model: Annotated[
        str | None, typer.Option(help="cnn | cnn_gap | resnet18 | efficientnet_lite0.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Number of epochs.")] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Run folder (default: paths.runs_dir/<model>-s<seed>-<time>)."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="'auto' (last.pt in --out, or the newest run of this model and seed) or a "
            "last.pt path; the run's settings must match (-s RUN/settings.toml).",
        ),
    ] = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
    quiet: Annotated[
        bool | None, typer.Option("--quiet/--no-quiet", "-q", help="Plain log lines.")
    ] = None,
) -> None:
    """Train a model on the processed store; evaluate the best checkpoint on test."""
    from ctscan.engine.train import run_training

    settings = _settings(
        settings_files,
        overrides,
        **{
            "model.name": model,
            "train.device": device,
            "train.epochs": epochs,
            "train.seed": seed,
            "train.quiet": quiet,
        },
    )
    result = run_training(settings, out_dir=out, resume=resume)
    if result is not None:
        typer.echo(json.dumps(result.summary(), indent=2))


@app.command()
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint file (.pt) written by train.")],
    split: Annotated[str, typer.Option(help="test | valid | train.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="Metrics as JSON on stdout.")] = False,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            help="Folder for the report files (default: eval-<split>/ beside the checkpoint).",
        ),
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda.")] = None,
    settings_files: SettingsFiles = None,
    overrides: Overrides = None,
) -> None:
    """Evaluate a checkpoint on a split: metrics, confusion matrix, calibration, worst errors."""
    from ctscan.engine.evaluate import run_evaluation
    from ctscan.render import render_report

    settings = _settings(settings_files, overrides, **{"train.device": device})
    result = run_evaluation(settings, checkpoint, split=split, out_dir=out)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _console(stderr=False).print(render_report(result))


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
    from ctscan.errors import Interrupted, Terminated, raise_terminated

    signal.signal(signal.SIGTERM, raise_terminated)  # unwind (and clean up) as Ctrl-C does
    try:
        app()
    except CtscanError as error:
        if debug_enabled():
            raise
        sys.exit(report(error))
    except (KeyboardInterrupt, SystemExit) as exc:
        interrupt = _interrupt_in(exc)
        if interrupt is None:
            raise
        terminated = isinstance(interrupt, Terminated)
        how = "by SIGTERM" if terminated else "by Ctrl-C"
        sys.exit(report(Interrupted(f"stopped {how}.", terminated=terminated)))

"""`python -m ctscan`, `torchrun -m ctscan` and the `ctscan` script run the CLI."""

from ctscan.jobs import exit_stopped, install_stop_handlers, stop_received


def main() -> None:
    """The stop handlers before the CLI's imports (typer, ~0.3 s): a Ctrl-C or SIGTERM while
    they load is the one stopped line and 130 / 143 too, not a KeyboardInterrupt traceback."""
    install_stop_handlers()
    try:
        from ctscan.cli import main as run_cli
    except BaseException:
        if stop_received() is None:  # not a stop: a bug
            raise
        exit_stopped(None, "")
    run_cli()


if __name__ == "__main__":
    main()

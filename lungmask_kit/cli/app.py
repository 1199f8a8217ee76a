"""`lungkit` entry point: registers one module per command and turns library errors into exit codes."""

from __future__ import annotations

import sys

import typer

from lungmask_kit import __version__
from lungmask_kit.errors import LungkitError

app = typer.Typer(
    name="lungkit",
    help=(
        "Lung masks, lungs-only and lungs-removed corpora, and a Parquet manifest for whole chest X-ray datasets.\n\n"
        "Examples:\n\n"
        "  lungkit segment examples/cxr-sample/images -o out/sample\n\n"
        "  lungkit variants out/sample/manifest.parquet -o out/variants --crop\n\n"
        "  lungkit train data/cxr-seg -o runs/seg --epochs 36\n\n"
        "  lungkit classify out/cls/manifest.parquet -o runs/cls --variant all"
    ),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lungkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    pass


def _register() -> None:
    from lungmask_kit.cli import calibrate, classify, evaluate, segment, stats, train, variants

    for module in (segment, variants, classify, train, calibrate, evaluate, stats):
        module.register(app)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the single place where LungkitError becomes a stderr line and an exit code."""
    _register()
    try:
        result = app(args=argv, standalone_mode=False)
    except LungkitError as err:
        print(f"lungkit: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("lungkit: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            return exc.exit_code
        if isinstance(exc, click.exceptions.Abort):
            return 1
        raise
    # click returns the code of a typer.Exit instead of raising it when standalone_mode is off
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

"""`lungkit` entry point: registers one module per command and turns library errors into exit codes.

The import rule: a module imports what it depends on at its top, so its first screen says what it uses. Imports
inside functions are kept for two reasons only: in `cli/` (the command's library is loaded when the command
runs, so `lungkit --help` and every usage error stay fast and never load torch), and for heavy or optional
packages (torch in modules that can work without it, ray, jinja2, matplotlib, joblib, pydicom, timm, openvino,
and the others `tests/test_architecture.py` lists), and only where the module does not load that package anyway:
that test checks it, with the layers' arrows and that every module imports alone. `tests/test_cli_usage.py` checks
that importing this module loads neither torch nor OpenCV nor pyarrow.
"""

from __future__ import annotations

import sys

import typer

from lungmask_kit import __version__
from lungmask_kit.errors import Interrupted, LungkitError

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
    add_completion=True,  # lungkit --install-completion
    context_settings={"help_option_names": ["-h", "--help"]},
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
    """Each command module adds its command, once, when this module is imported."""
    from lungmask_kit.cli import calibrate, classify, evaluate, merge, publish, report, segment, stats, train, variants
    from lungmask_kit.cli._options import arrange_help

    for module in (segment, merge, variants, report, publish, classify, train, calibrate, evaluate, stats):
        module.register(app)
    arrange_help(app)


_register()


def _usage_error(exc: Exception) -> int:
    """One line saying what is wrong, one usage hint, exit 2 (`lungkit` alone: after the help)."""
    ctx = getattr(exc, "ctx", None)
    command = ctx.command_path if ctx is not None else "lungkit"
    if type(exc).__name__ == "NoArgsIsHelpError":  # typer has printed the help already
        message = "no command given"
    else:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
    first = message.strip().splitlines()[0] if message.strip() else "invalid command line"
    print(f"lungkit: error: {first}", file=sys.stderr)
    print(f"Try '{command} -h' for help.", file=sys.stderr)
    return 2


def _raise_interrupted(signum, frame) -> None:
    raise Interrupted(signum)


# what an interrupted command leaves: runs resume (segment, variants, merge, publish); the others start over
_RESUMES = {"segment", "variants", "merge", "publish"}


def _after_interrupt(argv: list[str]) -> str:
    command = next((a for a in argv if not a.startswith("-")), "")
    if command in _RESUMES:
        return "run the same command again to resume"
    if command == "train":
        return "run the same command again with --resume to continue from the last finished epoch"
    return f"nothing was kept: `lungkit {command}` starts over when run again" if command else "nothing was kept"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; the single place where LungkitError becomes a stderr line and an exit code.

    SIGINT and SIGTERM become `Interrupted`: the run finishes or drops the work in flight, removes its temp
    files, and the process says so and exits with 130 / 143."""
    import signal

    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in previous:
            signal.signal(s, _raise_interrupted)
    except ValueError:  # not the main thread (embedded use): leave signals alone
        previous = {}
    try:
        result = app(args=argv, standalone_mode=False, prog_name="lungkit")
    except LungkitError as err:
        print(f"lungkit: error: {err}", file=sys.stderr)
        return err.exit_code
    except (Interrupted, KeyboardInterrupt) as err:
        print(f"lungkit: interrupted; {_after_interrupt(argv if argv is not None else sys.argv[1:])}", file=sys.stderr)
        return 128 + getattr(err, "signum", 2)
    except OSError as err:  # an OS error no command turned into a message (an output folder, a device)
        print(f"lungkit: error: {err.strerror or err}" + (f": {err.filename}" if err.filename else ""), file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        return 1
    except typer.TyperException as exc:  # a command-line mistake (typer vendors click: not click's classes)
        return _usage_error(exc)
    finally:
        for s_, handler in previous.items():
            signal.signal(s_, handler)
    # click returns the code of a typer.Exit instead of raising it when standalone_mode is off
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())

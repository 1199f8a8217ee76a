"""`lungkit stats`: the dataset mean/std a model config needs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit import defaults
from lungmask_kit.cli._options import DicomOpt, QuietOpt


def stats(
    input_dir: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).", metavar="DIR")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the statistics as JSON here (default: print only).")] = None,
    size: Annotated[int, typer.Option("--size", min=8, help="Images are resized to SIZE x SIZE first, as the model sees them.")] = defaults.INPUT_SIZE,
    glob: Annotated[str | None, typer.Option("--glob", help="Only paths matching this pattern.")] = None,
    dicom: DicomOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Pixel mean and std (pixels scaled to [0, 1] by bit depth) over a folder, at model resolution.

    Example: lungkit stats data/train/images -o stats.json
    """
    from lungmask_kit.fileio import atomic_write_bytes
    from lungmask_kit.stats import dataset_stats

    result = dataset_stats(input_dir, size, glob, dicom, progress=not quiet)
    text = json.dumps(result.as_dict(), indent=2)
    if out:
        atomic_write_bytes(out, text.encode())
    typer.echo(text)
    for s in result.skipped[:10]:
        typer.echo(f"lungkit: skipped {s}", err=True)
    if len(result.skipped) > 10:
        typer.echo(f"lungkit: ... and {len(result.skipped) - 10} more skipped", err=True)


def register(app: typer.Typer) -> None:
    app.command("stats")(stats)

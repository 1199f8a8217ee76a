"""`lungkit report`: the QC page of a segment or variants run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit.cli._options import InputRootOpt, QuietOpt
from lungmask_kit.cli._output import echo_report_summary


def report(
    run: Annotated[Path, typer.Argument(help="A segment or variants output folder (or its manifest.parquet).", metavar="OUT")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Report folder (default: OUT/report). Replaced whole on every run.")] = None,
    sample: Annotated[int, typer.Option("--sample", min=0, help="Random segmented images shown.")] = 48,
    lowest: Annotated[int, typer.Option("--lowest", min=0, help="Lowest-quality segmented images shown (by est_dice, else ood_score, else lung area).")] = 48,
    per_page: Annotated[int, typer.Option("--per-page", min=1, help="Thumbnails per page of a flagged sheet.")] = 120,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random sample.")] = 0,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="Rendering threads (0 = one per core).")] = 0,
    input_root: InputRootOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Write a static QC page: counts, histograms with the thresholds, and mask overlays of every flagged image
    (a sheet per QC reason), the lowest-quality ones and a random sample; failures with their errors.

    The folder works offline and can be copied anywhere (index.html, its pages, fig/ and img/).

    Examples:

      lungkit report out/sample

      lungkit report out/covidx -o reports/covidx --sample 200 --per-page 200
    """
    from lungmask_kit.report import ReportOptions, build_report, default_folder

    folder = out if out is not None else default_folder(run)
    options = ReportOptions(sample=sample, lowest=lowest, per_page=per_page, seed=seed, workers=workers,
                            input_root=input_root, progress=not quiet)
    s = build_report(run, folder, options)
    echo_report_summary(s, quiet)


def register(app: typer.Typer) -> None:
    app.command("report")(report)

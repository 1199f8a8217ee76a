"""`lungkit merge`: the manifest of a run segmented in shards (`lungkit segment --shard K/N`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit.cli._options import QuietOpt, ReportOpt
from lungmask_kit.cli._output import finish_run


def merge(
    out: Annotated[Path, typer.Argument(help="The output folder the shards wrote into.", metavar="OUT")],
    report: ReportOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write OUT/manifest.parquet from the parts every shard left in OUT, with labels and QC as a plain run.

    Refused while a shard still runs, or while some image has no row (its shard did not finish: run that shard
    again, it resumes). A plain `lungkit segment DIR -o OUT` re-run does the same after finishing any image left.

    Example:

      lungkit merge /shared/out/mimic --report
    """
    from lungmask_kit.segment import merge_shards

    s = merge_shards(out)
    finish_run(s, quiet, "lungkit merge summary", out, report)


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)

"""Builds the QC report of one run folder: opens its manifest's columns (never every image), picks what to show
(every flagged image, the lowest-quality ones, a random sample, every failure), renders those overlays in
threads, draws the figures and writes the pages into a locked staging folder that then replaces REPORT whole."""

from __future__ import annotations

import time
from pathlib import Path

from lungmask_kit.fileio import staged_folder
from lungmask_kit.manifest import open_run
from lungmask_kit.report.options import COLUMNS, MARKER, ReportOptions, ReportSummary
from lungmask_kit.report.pages import write_pages
from lungmask_kit.report.render import render_cards
from lungmask_kit.report.select import select
from lungmask_kit.runfolder import reading_run


def build_report(run: str | Path, report: str | Path, options: ReportOptions | None = None) -> ReportSummary:
    """`lungkit report RUN -o REPORT`: REPORT/index.html, its pages, figures and overlays. RUN is held
    (`runfolder.reading_run`) while it is read."""
    with reading_run(run, "report"):
        return _build_report(run, report, options or ReportOptions())


def _build_report(run: str | Path, report: str | Path, options: ReportOptions) -> ReportSummary:
    t0 = time.perf_counter()
    data = open_run(run, options.input_root, COLUMNS)
    report = Path(report)
    warnings: list[str] = []
    with staged_folder(report, data.run, MARKER, "lungkit report", allow_inside_run=True, warnings=warnings) as staging:
        (staging / MARKER).write_text("a lungkit report; `lungkit report` replaces this folder whole\n")
        chosen = select(data, options)
        cards = render_cards(data, chosen.shown(), staging / "img", options)
        pages = write_pages(data, chosen, cards, staging, options)
    flagged, failed = int(data.equals("qc_pass", False).sum()), int(data.equals("status", "error").sum())
    return ReportSummary(str(report / "index.html"), pages, len(cards), flagged, failed,
                         sum(c["placeholder"] for c in cards.values()), sum(c["no_outline"] for c in cards.values()),
                         time.perf_counter() - t0, warnings)

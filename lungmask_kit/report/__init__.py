"""`lungkit report`: a self-contained static QC page of a segment or variants run (HTML from Jinja2 templates,
figures from matplotlib, mask overlays from OpenCV), built into a temporary folder and swapped into place."""

from lungmask_kit.report.build import build_report
from lungmask_kit.report.options import ReportOptions, ReportSummary, default_folder

__all__ = ["ReportOptions", "ReportSummary", "build_report", "default_folder"]

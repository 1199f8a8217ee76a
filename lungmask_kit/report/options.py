"""What a report is built from and what it says when done: the manifest columns it reads, its options and its
summary (shared by the build, the selection, the rendering and the pages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

MARKER = ".lungkit-report"  # a folder holding it is ours to replace
COLUMNS = ("path", "sha256", "status", "error", "qc_pass", "qc_reason", "lung_area_fraction", "est_dice", "ood_score",
           "ood_image_score", "ood_shape_score", "mask_path", "lungs_path", "nolungs_path", "crop_box", "width",
           "height", "bit_depth", "label", "split", "source", "view", "modality", "right_lung_rle", "left_lung_rle",
           "heart_rle", "ctr")
GROUP_COLUMNS = ("label", "split", "source", "view", "modality")


@dataclass
class ReportOptions:
    sample: int = 48  # random ok images shown
    lowest: int = 48  # lowest-quality ok images shown
    per_page: int = 120  # thumbnails per page of a flagged sheet
    seed: int = 0
    workers: int = 0  # rendering threads (0: one per usable core)
    thumb_side: int = 224  # longest side of a thumbnail, px
    large_side: int = 2048  # longest side of the linked overlay, px (native size up to this)
    input_root: str | Path | None = None  # where the run's original images are now, if they moved
    progress: bool = True


@dataclass
class ReportSummary:
    index: str
    pages: int = 0
    images_shown: int = 0
    flagged: int = 0
    failed: int = 0
    unrendered: int = 0  # shown as a placeholder: the original is gone, changed or out of bounds, no variants either
    no_outline: int = 0  # shown without the mask's outline: the mask is missing, unreadable or of another size
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def default_folder(run: str | Path) -> Path:
    """Where `lungkit report RUN` writes without -o: RUN/report (RUN the folder holding the manifest)."""
    run = Path(run)
    return (run.parent if run.suffix == ".parquet" else run) / "report"

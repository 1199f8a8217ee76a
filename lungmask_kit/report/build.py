"""Builds the QC report of one run folder: reads its manifest's columns (never every image), picks what to show
(every flagged image, the lowest-quality ones, a random sample, every failure), renders those overlays in
threads, draws the figures and writes the pages into a temporary folder that then replaces REPORT whole."""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lungmask_kit.fileio import apply_umask, replace_folder
from lungmask_kit.runfolder import check_replaceable
from lungmask_kit.runtime import available_cores

if TYPE_CHECKING:
    import pyarrow as pa

MARKER = ".lungkit-report"  # a folder holding it is ours to replace
COLUMNS = ("path", "status", "error", "qc_pass", "qc_reason", "lung_area_fraction", "est_dice", "ood_score",
           "ood_image_score", "ood_shape_score", "mask_path", "lungs_path", "nolungs_path", "crop_box", "width",
           "height", "bit_depth", "label", "split", "source", "view", "modality", "right_lung_rle", "left_lung_rle")
GROUP_COLUMNS = ("label", "split", "source", "view", "modality")
FAILED_PER_PAGE = 500


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
    unrendered: int = 0  # shown as a placeholder: neither the original nor the run's variants could be read
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


@dataclass
class RunData:
    """The manifest's columns (a pyarrow table: no Python object per row, so memory stays small on a 377k-row
    corpus), the run's metadata and where its files are. Per-row Python values only for the rows shown."""

    run: Path
    meta: dict
    table: pa.Table
    input_root: Path
    masks_root: Path

    @property
    def n(self) -> int:
        return self.table.num_rows

    def has(self, name: str) -> bool:
        return name in self.table.column_names and self.table.column(name).null_count < self.n

    def value(self, name: str, i: int):
        return self.table.column(name)[int(i)].as_py() if name in self.table.column_names else None

    def values(self, name: str, rows) -> list:
        """A column's Python values at some row numbers (None for a column the manifest lacks)."""
        if name not in self.table.column_names:
            return [None] * len(rows)
        return self.table.column(name).take(np.asarray(rows, np.int64)).to_pylist()

    def numbers(self, name: str) -> np.ndarray:
        """A numeric column as float64, NaN where null (all NaN for a column the manifest lacks)."""
        if name not in self.table.column_names:
            return np.full(self.n, np.nan)
        return self.table.column(name).cast("float64").to_numpy(zero_copy_only=False)

    def equals(self, name: str, value) -> np.ndarray:
        """Bool per row: the column holds `value` (null is not equal)."""
        import pyarrow.compute as pc

        if name not in self.table.column_names:
            return np.zeros(self.n, bool)
        return pc.fill_null(pc.equal(self.table.column(name), value), False).to_numpy(zero_copy_only=False)


def load_run(run: str | Path, input_root: str | Path | None = None) -> RunData:
    """A run folder (or its manifest.parquet) -> RunData; a clear error for anything else."""
    from lungmask_kit.manifest import open_run_manifest, resolve_folder

    manifest, meta, table = open_run_manifest(run, COLUMNS)
    return RunData(manifest.parent, meta, table.combine_chunks(), resolve_folder(manifest, meta, "input_root", input_root),
                   resolve_folder(manifest, meta, "masks_root"))


def build_report(run: str | Path, report: str | Path, options: ReportOptions | None = None) -> ReportSummary:
    """`lungkit report RUN -o REPORT`: REPORT/index.html, its pages, figures and overlays."""
    from lungmask_kit.report.pages import write_pages
    from lungmask_kit.report.select import select

    t0 = time.perf_counter()
    options = options or ReportOptions()
    data = load_run(run, options.input_root)
    report = Path(report)
    check_replaceable(report, data.run, MARKER, "lungkit report", allow_inside_run=True)
    staging = report.parent / f".{report.name}.lungkit-tmp-{os.getpid()}"
    _remove_stale_staging(report)
    staging.mkdir(parents=True)
    try:
        (staging / MARKER).write_text("a lungkit report; `lungkit report` replaces this folder whole\n")
        chosen = select(data, options)
        cards, unrendered = render_cards(data, chosen.shown(), staging / "img", options)
        pages = write_pages(data, chosen, cards, staging, options)
        apply_umask(staging)
        replace_folder(staging, report)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    flagged, failed = int(data.equals("qc_pass", False).sum()), int(data.equals("status", "error").sum())
    return ReportSummary(str(report / "index.html"), pages, len(cards), flagged, failed, unrendered,
                         time.perf_counter() - t0)


def _remove_stale_staging(report: Path) -> None:
    """Staging folders of interrupted builds into the same REPORT."""
    if report.parent.is_dir():
        for stale in report.parent.glob(f".{report.name}.lungkit-tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)






# --- overlays ---

def image_name(path: str) -> str:
    """A file name for a manifest path's overlays: stable, and safe whatever characters the path holds."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def render_cards(data: RunData, indices: list[int], folder: Path, options: ReportOptions) -> tuple[dict[int, dict], int]:
    """Thumbnail and large overlay of each shown row, in threads: {row: card}, and how many are placeholders."""
    from tqdm.auto import tqdm

    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(options.workers or available_cores(), thread_name_prefix="lungkit-report") as pool:
        futures = {i: pool.submit(_render_one, data, i, folder, options) for i in indices}
        cards = {}
        for i in tqdm(indices, disable=not options.progress, unit="img", desc="overlays"):
            cards[i] = futures[i].result()
    return cards, sum(c["placeholder"] for c in cards.values())




def _render_one(data: RunData, i: int, folder: Path, options: ReportOptions) -> dict:
    from lungmask_kit.report.overlay import encode_jpeg, overlay, scaled_size

    name = image_name(data.value("path", i))
    image, mask = _image_and_mask(data, i)
    placeholder = image is None
    if placeholder:
        image, mask = _placeholder(), None
    thumb = overlay(image, mask, options.thumb_side)
    (folder / f"{name}.jpg").write_bytes(encode_jpeg(thumb))
    (folder / f"{name}-large.jpg").write_bytes(encode_jpeg(overlay(image, mask, options.large_side), 90))
    w, h = scaled_size(image.shape, options.thumb_side)
    return {"thumb": f"img/{name}.jpg", "large": f"img/{name}-large.jpg", "w": w, "h": h, "placeholder": placeholder}


def _image_and_mask(data: RunData, i: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The original image as the model saw it (a DICOM windowed) and the run's mask; where the original is gone,
    the image put back together from the run's lungs + nolungs outputs (they split it exactly)."""
    from lungmask_kit.derive import binarize_mask
    from lungmask_kit.discovery import wants_dicom
    from lungmask_kit import defaults
    from lungmask_kit.fileio import read_regular_file
    from lungmask_kit.imaging import ImageDecodeError, decode_image, read_gray

    mask = None
    mask_path = data.value("mask_path", i)
    if mask_path:
        try:
            mask = binarize_mask(read_gray(data.masks_root / mask_path))
        except (OSError, ImageDecodeError, ValueError):
            mask = None
    path = data.value("path", i)
    try:
        data_bytes = read_regular_file(data.input_root / path, defaults.MAX_FILE_BYTES)
        image = decode_image(data_bytes, dicom=wants_dicom(path, True)).model_view
    except (OSError, ImageDecodeError):
        image = _from_variants(data, i)
    if image is not None and mask is not None and mask.shape != image.shape:
        mask = None  # a cropped variants run: the outline would not line up
    return image, _with_sides(data, i, mask)


def _with_sides(data: RunData, i: int, mask: np.ndarray | None) -> np.ndarray | None:
    """The mask as lung labels (right and left lung tinted apart) where the row has both lungs' RLEs that
    cover exactly this mask; else the mask as it is."""
    from lungmask_kit import rle
    from lungmask_kit.postprocess import LEFT_LUNG, RIGHT_LUNG

    right, left = data.value("right_lung_rle", i), data.value("left_lung_rle", i)
    if mask is None or not right or not left:
        return mask
    try:
        right, left = rle.decode(right), rle.decode(left)
    except (ValueError, KeyError, TypeError):
        return mask
    if right.shape != mask.shape or left.shape != mask.shape or not np.array_equal(right | left, mask):
        return mask
    labels = np.zeros(mask.shape, np.uint8)
    labels[right], labels[left] = RIGHT_LUNG, LEFT_LUNG
    return labels


def _from_variants(data: RunData, i: int) -> np.ndarray | None:
    from lungmask_kit.imaging import ImageDecodeError, read_gray

    lungs, nolungs = data.value("lungs_path", i), data.value("nolungs_path", i)
    if not lungs or not nolungs or data.value("crop_box", i):
        return None
    try:
        a, b = read_gray(data.run / lungs), read_gray(data.run / nolungs)
    except (OSError, ImageDecodeError):
        return None
    return a + b if a.shape == b.shape and a.dtype == b.dtype else None


def _placeholder() -> np.ndarray:
    import cv2

    tile = np.full((240, 240), 60, np.uint8)
    cv2.putText(tile, "image not found", (22, 126), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 220, 1, cv2.LINE_AA)
    return tile

"""CheXmask's layout of lung masks (ngaggion/CheXmask-Database): one CSV row per image with `Right Lung`, `Left Lung`
and `Heart` as run-length strings, `Height`, `Width`, the quality index `Dice RCA (Mean)` / `(Max)`, and an image id
column named after the source corpus.

A run-length string is "start length start length ...": starts are 1-indexed into the image flattened row by row
(C order), as CheXmask's `DataPostprocessing/utils.py` decodes them. Shape contract: `encode` takes an (H, W)
bool or 0/1 array and never mutates it; `decode` returns (H, W) bool and checks the size before allocating.
"""

from __future__ import annotations

import csv
import math
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np

from lungmask_kit import defaults
from lungmask_kit.errors import LungkitError

# the image id column of each corpus CheXmask covers, in the order they are looked for
ID_COLUMNS = ("dicom_id", "Path", "Image Index", "ImageID", "image_id")
RIGHT, LEFT, HEART = "Right Lung", "Left Lung", "Heart"
RCA_MEAN, RCA_MAX = "Dice RCA (Mean)", "Dice RCA (Max)"
RECOMMENDED_MIN_RCA = 0.7  # CheXmask's advice: keep masks whose mean RCA Dice is at least this


def encode(mask: np.ndarray) -> str:
    """(H, W) mask -> CheXmask's run-length string (empty for an empty mask)."""
    flat = np.asarray(mask).astype(bool, copy=False).ravel()
    edges = np.flatnonzero(np.diff(np.concatenate(([False], flat, [False])).astype(np.int8)))
    starts, ends = edges[::2], edges[1::2]
    return " ".join(f"{s + 1} {e - s}" for s, e in zip(starts.tolist(), ends.tolist()))


def decode(text: str | None, height: int, width: int, max_pixels: int = defaults.MAX_IMAGE_PIXELS) -> np.ndarray:
    """CheXmask's run-length string -> (height, width) bool; ValueError for a size out of bounds, numbers that are
    no pixel index, or runs that overlap, go backwards or leave the image (all checked before the mask is
    allocated: about one byte per pixel then)."""
    height, width = int(height), int(width)
    if height <= 0 or width <= 0 or height * width > max_pixels:
        raise ValueError(f"mask size {height}x{width} is out of bounds (at most {max_pixels} pixels)")
    n = height * width
    try:
        runs = np.array((text or "").split(), dtype=np.int64)
    except (ValueError, OverflowError) as err:
        raise ValueError(f"not a CheXmask run-length string: {err}") from err
    if runs.size % 2:
        raise ValueError("not a CheXmask run-length string: an odd number of values")
    starts, lengths = runs[::2] - 1, runs[1::2]
    if runs.size and (starts.min() < 0 or lengths.min() < 0 or (starts + lengths).max() > n):
        raise ValueError(f"a run leaves the {height}x{width} image")
    if runs.size > 2 and (starts[1:] < starts[:-1] + lengths[:-1]).any():
        raise ValueError("not a CheXmask run-length string: runs overlap or go backwards")
    marks = np.zeros(n + 1, np.int8)  # runs are disjoint and in order: a running sum of +1 / -1 stays 0 or 1
    marks[starts] += 1
    marks[starts + lengths] -= 1
    return np.cumsum(marks[:n], dtype=np.int8).view(bool).reshape(height, width)


def check_size(height: int, width: int, image_shape: tuple[int, int] | None) -> None:
    """Refuse, before decoding, a mask declared larger than any layout of its image (CheXmask's are the image's
    own size or 1024 px squares): a 60-byte row declaring 20000x20000 must not allocate 400 M pixels."""
    if image_shape is None:
        return
    side = max(max(image_shape), 1024)
    if height > side or width > side:
        raise ValueError(f"CheXmask declares a {width}x{height} mask for a {image_shape[1]}x{image_shape[0]} image: "
                         "larger than any layout of it")


def fit_to_image(mask: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, str | None]:
    """A CheXmask mask (h, w) bool brought to an image's (H, W): (mask, what was done, None when nothing was).

    CheXmask's preprocessed masks are drawn on the image padded to a centred square and scaled to 1024x1024
    (its DataPreparation code); those are un-padded: scaled to the longest side, then cropped. A mask of the
    image's own aspect ratio (the original-resolution layout, or a resized copy) is scaled. Nearest neighbour
    throughout; a mask whose aspect ratio fits neither layout is a ValueError (stretching it would shift the lungs).
    """
    h, w = mask.shape
    height, width = shape
    if (h, w) == (height, width):
        return mask, None

    def scaled(m: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
        return cv2.resize(m.astype(np.uint8), (size_hw[1], size_hw[0]), interpolation=cv2.INTER_NEAREST) > 0

    if abs(h * width - w * height) <= max(h, w, height, width):  # the same aspect ratio, to a pixel's rounding
        return scaled(mask, shape), f"chexmask {w}x{h}, resized (nearest) to {width}x{height}"
    if h == w:  # the preprocessed layout: the image padded to a centred square
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        return (scaled(mask, (side, side))[top:top + height, left:left + width],
                f"chexmask {w}x{h} of the image padded to a square: un-padded and resized (nearest) to {width}x{height}")
    raise ValueError(f"CheXmask's {w}x{h} mask fits neither the {width}x{height} image's aspect ratio nor its centred "
                     "square padding: not the same image, or another layout")


@dataclass(frozen=True)
class Row:
    """One image's CheXmask entry."""

    image_id: str
    right: str
    left: str
    height: int
    width: int
    rca_mean: float | None
    rca_max: float | None
    heart: str = ""  # empty where the CSV has no Heart column or no heart for the image


@dataclass
class CsvRows:
    """What `read_csv` read: the rows kept, the id column, rows dropped by --min-rca, rows it could not read
    (a short row, a size that is not a positive whole number: skipped and counted, the rest read on)."""

    rows: list[Row]
    id_column: str
    dropped: int = 0
    unreadable: int = 0


def read_csv(path: str | Path, id_column: str | None = None, min_rca: float | None = None,
             only_ids: set[str] | None = None, with_masks: bool = True) -> CsvRows:
    """A CheXmask CSV, read as a stream: memory grows with the rows kept, not with the file. `with_masks=False`
    keeps ids, sizes and RCA only (a first pass to match ids with images); `only_ids` keeps only those ids' rows
    (the second pass, with their run-length strings). A BOM before the header is allowed; a NaN RCA counts as
    none (dropped by --min-rca)."""
    # a run-length string of a large mask is a long field; the limit is process-wide, so it is put back after
    previous = csv.field_size_limit(min(sys.maxsize, 1 << 31))
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            column = id_column or next((c for c in ID_COLUMNS if c in header), None)
            missing = [c for c in (RIGHT, LEFT, "Height", "Width") if c not in header]
            if column is None or column not in header or missing:
                raise LungkitError(
                    f"{path} is not a CheXmask CSV: " + (f"no {', '.join(missing)} column" if missing else
                    f"no image id column ({', '.join(ID_COLUMNS)}; give another with --chexmask-id)"))
            out = CsvRows([], column)
            for r in reader:
                image_id = r.get(column)
                if only_ids is not None and image_id not in only_ids:
                    continue
                try:
                    height, width = _size(r.get("Height")), _size(r.get("Width"))
                except ValueError:
                    out.unreadable += 1
                    continue
                rca = _number(r.get(RCA_MEAN))
                if min_rca is not None and (rca is None or rca < min_rca):
                    out.dropped += 1
                    continue
                masks = [r.get(k) or "" for k in (RIGHT, LEFT, HEART)] if with_masks else ["", "", ""]
                out.rows.append(Row(str(image_id), masks[0], masks[1], height, width, rca, _number(r.get(RCA_MAX)),
                                    masks[2]))
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as err:
        raise LungkitError(f"cannot read the CheXmask CSV {path}: {err}") from err
    finally:
        csv.field_size_limit(previous)
    return out


def _size(text) -> int:
    """A Height or Width cell -> a positive whole number of pixels; ValueError for anything else (inf, 1e400,
    -3, 2.5, empty)."""
    if not isinstance(text, str):  # a short row's missing cell
        raise ValueError("no size")
    value = float(text)  # ValueError for text that is no number
    if not math.isfinite(value) or value <= 0 or value != int(value) or value > 1 << 31:
        raise ValueError(f"not a size: {text!r}")
    return int(value)


def _number(text) -> float | None:
    try:
        value = float(text) if text not in (None, "") else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


@dataclass
class Matches:
    """How a CheXmask CSV's rows met the images: each matched image's row, the rows that fit no image, and the
    ids refused as ambiguous (an id that fits several images, or an image that several ids fit)."""

    matched: dict[str, Row]
    unmatched: list[Row]
    ambiguous: list[str]
    unreadable: int = 0  # CSV rows read_csv could not read (counted there)

    def note(self) -> str:
        """One line for a run's summary, naming the first ambiguous id."""
        text = f"CheXmask: {len(self.matched)} image(s) matched, {len(self.unmatched)} row(s) match no image"
        if self.unreadable:
            text += f", {self.unreadable} unreadable row(s) skipped (a size that is not a positive whole number)"
        if self.ambiguous:
            text += (f", {len(self.ambiguous)} ambiguous id(s) refused (e.g. {self.ambiguous[0]!r}: it fits several "
                     "images or shares its image with another id; give the images' folder that the ids' paths name)")
        return text


def _parts(path: str) -> list[str]:
    return [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]


def _same_file(a: str, b: str) -> bool:
    """Two file names of one image: equal, or equal but for the extension (a corpus converted to PNG)."""
    return a == b or PurePosixPath(a).stem == PurePosixPath(b).stem


def _fits(id_parts: list[str], rel_parts: list[str]) -> bool:
    """An id with folders fits an image when the shorter path is the end of the longer, folder by folder
    (CheXpert's Path starts with the corpus folder; an image folder may start further down or further up)."""
    n = min(len(id_parts), len(rel_parts))
    if not _same_file(id_parts[-1], rel_parts[-1]):
        return False
    return id_parts[-n:-1] == rel_parts[-n:-1]


def match_images(rows: list[Row], image_rels: list[str]) -> Matches:
    """Each image's row, matched only where there is no doubt. An id with folders (CheXpert's `Path`) must agree
    with the image's path folder by folder, from the file name up, as far as the shorter one goes: a file name
    shared by every study (`view1_frontal.jpg`) never matches on the name alone. An id without folders (MIMIC's
    dicom_id, ChestX-ray14's Image Index, VinDr's image_id) matches an image of that name or stem. An id that fits
    several images, and every id of an image that several ids fit, is refused as ambiguous."""
    by_stem: dict[str, list[str]] = {}
    for rel in image_rels:
        by_stem.setdefault(PurePosixPath(rel).stem, []).append(rel)
    claims: dict[str, list[Row]] = {}
    unmatched, ambiguous = [], []
    for row in rows:
        id_parts = _parts(row.image_id)
        if not id_parts:
            unmatched.append(row)
            continue
        candidates = by_stem.get(PurePosixPath(id_parts[-1]).stem, [])
        if len(id_parts) == 1:
            found = [rel for rel in candidates if _same_file(id_parts[0], PurePosixPath(rel).name)]
        else:
            found = [rel for rel in candidates if _fits(id_parts, _parts(rel))]
        if not found:
            unmatched.append(row)
        elif len(found) > 1:
            ambiguous.append(row.image_id)
        else:
            claims.setdefault(found[0], []).append(row)
    matched = {}
    for rel, claimants in claims.items():
        if len(claimants) == 1:
            matched[rel] = claimants[0]
        else:
            ambiguous += [r.image_id for r in claimants]
    return Matches(matched, unmatched, ambiguous)


def write_csv(path: Path, rows: list[dict]) -> None:
    """A CSV in CheXmask's layout (`rows`: id, Right Lung, Left Lung, Heart, Height, Width, Dice RCA (Mean), ...)."""
    if not rows:
        return
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

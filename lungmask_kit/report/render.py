"""The report's overlays: each shown row's original image (or, where it is gone, the image put back together from
the run's variants) with its mask tinted per lung (and the heart, where the run drew it), as a thumbnail and a large JPEG, rendered in threads.

Every file comes through the run's `RunManifest` (paths kept inside their folders) and `imaging.read_input`
(regular files only, the original checked against the sha256 the run recorded)."""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from lungmask_kit import rle
from lungmask_kit.derive import binarize_mask
from lungmask_kit.discovery import wants_dicom
from lungmask_kit.fileio import OutsidePathError
from lungmask_kit.imaging import ImageDecodeError, InputChangedError, read_input
from lungmask_kit.manifest import RunManifest
from lungmask_kit.postprocess import LEFT_LUNG, RIGHT_LUNG
from lungmask_kit.report.options import ReportOptions
from lungmask_kit.report.overlay import encode_jpeg, overlay, scaled_size
from lungmask_kit.runtime import available_cores


def image_name(path: str) -> str:
    """A file name for a manifest path's overlays: stable, and safe whatever characters the path holds."""
    return hashlib.sha1(path.encode("utf-8", "surrogateescape")).hexdigest()[:20]


def render_cards(data: RunManifest, indices: list[int], folder: Path, options: ReportOptions) -> dict[int, dict]:
    """Thumbnail and large overlay of each shown row, in threads: {row: card}. A card's `problem` says what
    could not be shown (no original, no outline). An interrupt cancels the overlays not yet started."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = ThreadPoolExecutor(options.workers or available_cores(), thread_name_prefix="lungkit-report")
    try:
        futures = {i: pool.submit(_render_one, data, i, folder, options) for i in indices}
        cards = {i: futures[i].result() for i in tqdm(indices, disable=not options.progress, unit="img", desc="overlays")}
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return cards


def _render_one(data: RunManifest, i: int, folder: Path, options: ReportOptions) -> dict:
    name = image_name(data.value("path", i))
    image, mask, problem = image_and_mask(data, i)
    placeholder = image is None
    if placeholder:
        image, mask = _placeholder(problem or "image not found"), None
    heart = _heart(data, i, mask.shape) if mask is not None else None
    (folder / f"{name}.jpg").write_bytes(encode_jpeg(overlay(image, mask, options.thumb_side, heart=heart)))
    (folder / f"{name}-large.jpg").write_bytes(encode_jpeg(overlay(image, mask, options.large_side, 0.28, heart), 90))
    w, h = scaled_size(image.shape, options.thumb_side)
    return {"thumb": f"img/{name}.jpg", "large": f"img/{name}-large.jpg", "w": w, "h": h, "placeholder": placeholder,
            "no_outline": not placeholder and mask is None, "problem": problem}


def image_and_mask(data: RunManifest, i: int) -> tuple[np.ndarray | None, np.ndarray | None, str | None]:
    """(image, mask or lung labels, what is wrong): the original as the model saw it (a DICOM windowed), checked
    to be the file the run read; where it is gone, the image put back together from the run's lungs + nolungs
    outputs (they split it exactly). A mask that is missing, unreadable or of another size is None, and said."""
    path = data.value("path", i)
    problems = []
    try:
        _, decoded = read_input(data.input_file(path), dicom=wants_dicom(path, True), expect_sha256=data.value("sha256", i))
        image = decoded.model_view
    except InputChangedError as err:
        image = None  # another image under the same name: drawing this run's mask on it would mislead
        problems.append(f"original {err}")
    except OutsidePathError as err:
        image = _from_variants(data, i)  # the run's own files, never the file the manifest points at
        problems.append(f"original {err}")
    except (OSError, ImageDecodeError) as err:
        image = _from_variants(data, i)
        if image is None:
            problems.append(f"original not readable ({err})")
    mask, mask_problem = _mask(data, i)
    if mask_problem and data.value("status", i) == "ok":
        problems.append(mask_problem)
    if image is not None and mask is not None and mask.shape != image.shape:
        if not data.value("crop_box", i):
            problems.append("mask size differs from the image's")
        mask = None  # (a cropped variants run: the outline would not line up)
    return image, _with_sides(data, i, mask), "; ".join(problems) or None


def _mask(data: RunManifest, i: int) -> tuple[np.ndarray | None, str | None]:
    rel = data.value("mask_path", i)
    if not rel:  # a variants run of masks that were no files (CheXmask, a masks-only dataset): its lung RLEs
        right, left = data.value("right_lung_rle", i), data.value("left_lung_rle", i)
        if not right or not left:
            return None, "no mask in the manifest"
        try:
            return rle.decode(right) | rle.decode(left), None
        except (ValueError, KeyError, TypeError) as err:
            return None, f"mask not readable ({err})"
    try:
        return binarize_mask(read_input(data.mask_file(rel))[1].pixels), None
    except (OSError, ImageDecodeError, ValueError) as err:
        return None, f"mask not readable ({err})"


def _with_sides(data: RunManifest, i: int, mask: np.ndarray | None) -> np.ndarray | None:
    """The mask as lung labels (right and left lung tinted apart) where the row has both lungs' RLEs that
    cover exactly this mask; else the mask as it is."""
    right, left = data.value("right_lung_rle", i), data.value("left_lung_rle", i)
    if mask is None or not right or not left:
        return mask
    try:
        right, left = rle.decode(right, expect_shape=mask.shape), rle.decode(left, expect_shape=mask.shape)
    except (ValueError, KeyError, TypeError):
        return mask
    if not np.array_equal(right | left, mask):
        return mask
    labels = np.zeros(mask.shape, np.uint8)
    labels[right], labels[left] = RIGHT_LUNG, LEFT_LUNG
    return labels


def _heart(data: RunManifest, i: int, shape: tuple[int, int]) -> np.ndarray | None:
    """The row's heart mask where it has one of the mask's size (else none is drawn)."""
    heart = data.value("heart_rle", i)
    if not heart:
        return None
    try:
        return rle.decode(heart, expect_shape=shape)
    except (ValueError, KeyError, TypeError):
        return None


def _from_variants(data: RunManifest, i: int) -> np.ndarray | None:
    lungs, nolungs = data.value("lungs_path", i), data.value("nolungs_path", i)
    if not lungs or not nolungs or data.value("crop_box", i):
        return None
    try:
        a, b = read_input(data.output_file(lungs))[1].pixels, read_input(data.output_file(nolungs))[1].pixels
    except (OSError, ImageDecodeError):
        return None
    return a + b if a.shape == b.shape and a.dtype == b.dtype else None


def _placeholder(problem: str) -> np.ndarray:
    """A grey tile saying why there is no picture (the first words of the problem)."""
    tile = np.full((240, 240), 60, np.uint8)
    words = "image changed since the run" if "sha256" in problem else "image not found"
    cv2.putText(tile, words, (12, 126), cv2.FONT_HERSHEY_SIMPLEX, 0.55, 220, 1, cv2.LINE_AA)
    return tile

"""What each published row carries besides the manifest's columns: the four images as PNG bytes (full mode) or
the mask as a COCO RLE (masks-only). Runs in reading threads; errors name the row's file."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lungmask_kit import defaults
from lungmask_kit.errors import LungkitError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_payload(source, row: dict) -> dict:
    from lungmask_kit.imaging import encode_png

    name = row["path"]
    out = {"image": {"bytes": _original_png(source, row), "path": _png_name(name)},
           "mask": {"bytes": encode_png(_mask(source, row).astype(np.uint8) * 255), "path": _png_name(name)}}
    for variant in ("lungs", "nolungs"):
        rel = row.get(f"{variant}_path")
        out[variant] = {"bytes": _read(source.run / rel, f"{variant} output"), "path": _png_name(name)} if rel else None
    return out


def masks_payload(source, row: dict) -> dict:
    from lungmask_kit import rle

    return {"mask_rle": rle.encode(_mask(source, row))}


def _png_name(rel: str) -> str:
    from pathlib import PurePosixPath

    return str(PurePosixPath(rel).with_suffix(".png"))


def _read(path: Path, what: str) -> bytes:
    from lungmask_kit.fileio import InputReadError, read_regular_file

    try:
        return read_regular_file(path, defaults.MAX_FILE_BYTES)
    except InputReadError as err:
        raise LungkitError(f"cannot read the run's {what} {path.name}: {err}") from err


def _original_png(source, row: dict) -> bytes:
    """The source image as PNG: its own bytes when it is a PNG, else its decoded pixels (what lungkit kept:
    16-bit for a deep DICOM) encoded as PNG. It must still be the file the run segmented."""
    from lungmask_kit.discovery import wants_dicom
    from lungmask_kit.fileio import InputReadError, read_regular_file
    from lungmask_kit.imaging import ImageDecodeError, decode_image, encode_png

    path = source.input_root / row["path"]
    try:
        data = read_regular_file(path, defaults.MAX_FILE_BYTES)
    except InputReadError as err:
        raise LungkitError(f"original image {row['path']} not readable under {source.input_root} ({err}): give "
                           "--input-root where the run's images are now, or publish --masks-only") from err
    if row.get("sha256") and hashlib.sha256(data).hexdigest() != row["sha256"]:
        raise LungkitError(f"original image {row['path']} changed since the run (sha256 differs): re-run segment first")
    if data[:8] == PNG_MAGIC:
        return data
    try:
        return encode_png(decode_image(data, dicom=wants_dicom(row["path"], True)).pixels)
    except ImageDecodeError as err:
        raise LungkitError(f"original image {row['path']}: {err}") from err


def _mask(source, row: dict) -> np.ndarray:
    """The mask the run used, as (height, width) bool: binarised by variants' rule, resized (nearest) where the
    run resized it (variants --resize-masks)."""
    import cv2

    from lungmask_kit.derive import binarize_mask
    from lungmask_kit.imaging import ImageDecodeError, decode_image

    rel = row.get("mask_path")
    if not rel:
        raise LungkitError(f"{row['path']}: the manifest names no mask")
    try:
        mask = binarize_mask(decode_image(_read(source.masks_root / rel, "mask")).pixels)
    except ImageDecodeError as err:
        raise LungkitError(f"mask of {row['path']}: {err}") from err
    h, w = row.get("height"), row.get("width")
    if h and w and mask.shape != (h, w):
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask

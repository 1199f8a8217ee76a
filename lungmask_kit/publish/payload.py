"""What each published row carries besides the manifest's columns: the four images (five with the heart) as PNG bytes (full mode) or
the mask as a COCO RLE (masks-only). Runs in reading threads; errors name the row's file. Every file is reached
through the run's `RunManifest` (a manifest's paths never lead out of their folders) and read as a regular file."""

from __future__ import annotations

from pathlib import PurePosixPath

import cv2
import numpy as np

from lungmask_kit import rle
from lungmask_kit.derive import binarize_mask
from lungmask_kit.discovery import wants_dicom
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import InputReadError, OutsidePathError
from lungmask_kit.imaging import ImageDecodeError, InputChangedError, decode_image, encode_png, read_checked, read_input
from lungmask_kit.manifest import RunManifest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def full_payload(source: RunManifest, row: dict, strip_text: bool = True) -> dict:
    """`strip_text`: the original PNG's text chunks, EXIF and time stamp left out (a PACS export may write the
    patient's name there); its pixels, palette and colour information kept."""
    name = _png_name(row.get("_published_path") or row["path"])
    original = _original_png(source, row)
    out = {"image": {"bytes": without_text_chunks(original) if strip_text else original, "path": name},
           "mask": {"bytes": encode_png(_mask(source, row).astype(np.uint8) * 255), "path": name}}
    for variant in ("lungs", "nolungs", "heart"):
        rel = row.get(f"{variant}_path")
        out[variant] = {"bytes": _read_output(source, rel, f"{variant} output"), "path": name} if rel else None
    if out["heart"] is None and row.get("heart_rle"):  # no heart PNG written (segment without --heart-png)
        out["heart"] = {"bytes": encode_png(_heart(row).view(np.uint8) * 255), "path": name}
    return out


def _heart(row: dict) -> np.ndarray:
    try:
        return rle.decode(row["heart_rle"], expect_shape=(row["height"], row["width"]))
    except (ValueError, KeyError, TypeError) as err:
        raise LungkitError(f"{row['path']}: its heart mask is unreadable ({err})") from err


# ancillary PNG chunks that carry text or time, not pixels: tEXt/zTXt/iTXt (free text: PatientName=...), eXIf, tIME
_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"tIME"}


def without_text_chunks(png: bytes) -> bytes:
    """A PNG's bytes without its text, EXIF and time chunks (every other chunk as it is, CRCs untouched)."""
    if png[:8] != PNG_MAGIC:
        return png
    out, i = [png[:8]], 8
    while i + 8 <= len(png):
        length = int.from_bytes(png[i:i + 4], "big")
        end = i + 12 + length
        if png[i + 4:i + 8] not in _TEXT_CHUNKS:
            out.append(png[i:end])
        i = end
    return b"".join(out)


def masks_payload(source: RunManifest, row: dict, strip_text: bool = True) -> dict:
    return {"mask_rle": rle.encode(_mask(source, row))}


def _png_name(rel: str) -> str:
    return str(PurePosixPath(rel).with_suffix(".png"))


def _read_output(source: RunManifest, rel: str, what: str) -> bytes:
    try:
        return read_checked(source.output_file(rel))
    except InputReadError as err:
        raise LungkitError(f"cannot read the run's {what} {rel}: {err}") from err


def _original_png(source: RunManifest, row: dict) -> bytes:
    """The source image as PNG: its own bytes when it is a PNG, else its decoded pixels (what lungkit kept:
    16-bit for a deep DICOM) encoded as PNG. It must still be the file the run segmented."""
    rel = row["path"]
    try:
        data = read_checked(source.input_file(rel), expect_sha256=row.get("sha256"))
        if data[:8] == PNG_MAGIC:
            return data  # its own bytes: nothing to decode
        decoded = decode_image(data, dicom=wants_dicom(rel, True))
    except OutsidePathError as err:
        raise LungkitError(f"the manifest's image {err}: refusing to publish a file from outside the run's input") from err
    except InputChangedError as err:
        raise LungkitError(f"original image {rel} changed since the run (sha256 differs): re-run segment first") from err
    except InputReadError as err:
        raise LungkitError(f"original image {rel} not readable under {source.input_root} ({err}): give "
                           "--input-root where the run's images are now, or publish --masks-only") from err
    except ImageDecodeError as err:
        raise LungkitError(f"original image {rel}: {err}") from err
    return encode_png(decoded.pixels)


def lungs_from_rles(row: dict) -> np.ndarray | None:
    """The mask as the union of the row's right and left lung RLEs (checked against its size), or None."""
    right, left = row.get("right_lung_rle"), row.get("left_lung_rle")
    if not right or not left:
        return None
    shape = (row["height"], row["width"]) if row.get("height") and row.get("width") else None
    try:
        return rle.decode(right, expect_shape=shape) | rle.decode(left, expect_shape=shape)
    except (ValueError, KeyError, TypeError) as err:
        raise LungkitError(f"{row['path']}: its lung masks are unreadable ({err})") from err


def _mask(source: RunManifest, row: dict) -> np.ndarray:
    """The mask the run used, as (height, width) bool: binarised by variants' rule, resized (nearest) where the
    run resized it (variants --resize-masks)."""
    rel = row.get("mask_path")
    if not rel:
        lungs = lungs_from_rles(row)  # a variants run of masks that were no files (CheXmask, a masks-only dataset)
        if lungs is None:
            raise LungkitError(f"{row['path']}: the manifest names no mask and has no right and left lung masks")
        return lungs
    try:
        mask = binarize_mask(read_input(source.mask_file(rel))[1].pixels)
    except InputReadError as err:
        raise LungkitError(f"cannot read the mask of {row['path']} ({rel}): {err}") from err
    except ImageDecodeError as err:
        raise LungkitError(f"mask of {row['path']}: {err}") from err
    h, w = row.get("height"), row.get("width")
    if h and w and mask.shape != (h, w):
        mask = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    return mask

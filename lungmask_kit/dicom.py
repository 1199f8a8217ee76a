"""DICOM input: one 2-D radiograph per file -> the pixels lungkit keeps, the windowed view the model sees, and the
header values the manifest records.

What the two arrays hold (README, "DICOM input"):
- `pixels`: the Modality LUT's output (rescale slope/intercept or a LUT), MONOCHROME1 inverted so that dense is
  bright as in MONOCHROME2, shifted up when the modality range starts below zero (CT in HU), rounded; uint16 when
  BitsStored > 8 or the values exceed 255, else uint8. The lungs / nolungs outputs keep these values: no window
  throws contrast away.
- `windowed`: the file's first VOI LUT or window (Window Center/Width) applied to the same values, inverted for
  MONOCHROME1, as uint8 -- the picture a reading station shows, and what the model sees. None when the file has
  neither; the model then sees `pixels` as it sees any PNG of that depth.
"""

from __future__ import annotations

import io

import numpy as np

DICOM_MAGIC = b"DICM"
# Modalities of projection radiographs; anything else (CT, MR, US, ...) is flagged by QC.
RADIOGRAPH_MODALITIES = ("CR", "DX")
LATERAL_VIEWS = ("LL", "RL", "LAT", "LATERAL", "L")  # "L": how label files (e.g. cxr-ood) often write it
HEADER_COLUMNS = ("patient_id", "view", "modality", "study_uid", "series_uid", "sop_uid", "pixel_spacing")


def is_dicom(data: bytes) -> bool:
    """Whether the bytes open with a DICOM Part 10 preamble (128 bytes, then 'DICM')."""
    return data[128:132] == DICOM_MAGIC


def is_lateral(view: str | None) -> bool:
    """Whether a ViewPosition (or view code meaning) names a lateral projection (decubitus views are frontal)."""
    if not view:
        return False
    v = view.strip().upper()
    return v in LATERAL_VIEWS or ("LATERAL" in v and "DECUBITUS" not in v)


class DicomError(ValueError):
    """The file is not a usable DICOM radiograph; the message says why."""


def read_dataset(data: bytes, force: bool = False, header_only: bool = False):
    """Parse DICOM bytes (pixel data still encoded; `header_only`: not read at all). `force` reads files without
    the Part 10 preamble."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(data), force=force, stop_before_pixels=header_only)
    except InvalidDicomError as err:
        raise DicomError("not a DICOM file (no 'DICM' preamble)") from err
    except Exception as err:  # pydicom raises many types for a truncated or malformed header
        raise DicomError(f"cannot parse DICOM header: {type(err).__name__}: {_first_line(err)}") from err


def header_columns(ds) -> dict:
    """Manifest columns from the header; a missing or empty element is None."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        spacing = [float(v) for v in spacing] if spacing and len(spacing) == 2 else None
    except (TypeError, ValueError):
        spacing = None
    return {
        "patient_id": _text(ds.get("PatientID")),
        "view": _text(ds.get("ViewPosition")) or _view_code(ds),
        "modality": _text(ds.get("Modality")),
        "study_uid": _text(ds.get("StudyInstanceUID")),
        "series_uid": _text(ds.get("SeriesInstanceUID")),
        "sop_uid": _text(ds.get("SOPInstanceUID")),
        "pixel_spacing": spacing,
    }


def check_single_image(ds, max_pixels: int) -> None:
    """Refuse what is not one 2-D image before its pixels are decoded (reports, multi-frame, bombs)."""
    if "PixelData" not in ds:
        kind = getattr(ds.get("SOPClassUID"), "name", None) or "unknown SOP class"
        raise DicomError(f"DICOM object has no pixel data ({kind}): not an image")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise DicomError(f"multi-frame DICOM ({frames} frames): lungkit reads one 2-D radiograph per file")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows * cols == 0:
        raise DicomError("DICOM image has no pixels (Rows or Columns is 0 or missing)")
    if rows * cols > max_pixels:
        raise DicomError(f"image too large: declared {cols}x{rows} exceeds {max_pixels} pixels")


def decode_pixels(ds) -> np.ndarray:
    """The stored pixel array, decompressed by whichever plugin handles the transfer syntax."""
    try:
        return ds.pixel_array
    except Exception as err:  # missing codec (RuntimeError), corrupt stream, inconsistent header
        syntax = getattr(ds.file_meta.get("TransferSyntaxUID"), "name", "unknown transfer syntax") if hasattr(ds, "file_meta") else "unknown transfer syntax"
        raise DicomError(f"cannot decode DICOM pixel data ({syntax}): {_first_line(err)}") from err


def presentation(ds, stored: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(pixels, windowed) of a monochrome image, as described in the module docstring. `stored` is not mutated."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    lo, hi = _modality_range(ds)
    monochrome1 = ds.PhotometricInterpretation == "MONOCHROME1"
    top = hi - min(lo, 0.0)
    dtype = np.uint16 if int(ds.get("BitsStored") or 8) > 8 or top > 255 else np.uint8
    if _integer_rescale(ds) is not None and "VOILUTSequence" not in ds and "WindowCenter" not in ds:
        return _integer_presentation(ds, stored, lo, hi, dtype, monochrome1), None
    values = apply_modality_lut(stored, ds)
    windowed = None
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        try:
            ends = np.array([lo, hi]).astype(values.dtype)  # the window's output range: where the two ends land
            windowed = _to_uint8(apply_voi_lut(values, ds, prefer_lut=True), apply_voi_lut(ends, ds, prefer_lut=True), monochrome1)
        except (ValueError, TypeError, IndexError, KeyError):  # a malformed window: the model sees the pixels instead
            windowed = None
    # one float64 working copy, changed in place (a 14000 px radiograph is 1.6 GB per float64 copy)
    shifted = np.array(values, np.float64)
    del values
    if monochrome1:
        np.subtract(lo + hi, shifted, out=shifted)
    shifted -= min(lo, 0.0)
    np.rint(shifted, out=shifted)
    np.clip(shifted, 0, np.iinfo(dtype).max, out=shifted)
    return shifted.astype(dtype), windowed


def _integer_rescale(ds) -> tuple[int, int] | None:
    """(slope, intercept) when the Modality LUT is a rescale by integers (most CR/DX: none, or slope 1), so the
    pixels can be computed exactly in integers; None for a LUT sequence or a fractional rescale."""
    if "ModalityLUTSequence" in ds:
        return None
    try:
        slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    except (TypeError, ValueError):
        return None
    if not (slope.is_integer() and intercept.is_integer()) or abs(slope) > 1 << 15 or abs(intercept) > 1 << 30:
        return None
    return int(slope), int(intercept)


def _integer_presentation(ds, stored: np.ndarray, lo: float, hi: float, dtype, monochrome1: bool) -> np.ndarray:
    """presentation()'s pixels without a float copy: the same values, in one int32 working array (half the
    float64 one; int64 where the range needs it)."""
    slope, intercept = _integer_rescale(ds)
    bound = 2 * max(abs(lo), abs(hi)) + abs(intercept) + 1  # every intermediate stays within this
    values = stored.astype(np.int32 if bound < 1 << 31 else np.int64)
    if slope != 1:
        values *= slope
    if intercept:
        values += intercept
    if monochrome1:
        np.subtract(int(lo + hi), values, out=values)
    values -= int(min(lo, 0.0))
    np.clip(values, 0, np.iinfo(dtype).max, out=values)
    return values.astype(dtype)


def _modality_range(ds) -> tuple[float, float]:
    """The Modality LUT's output for the smallest and largest stored values BitsStored allows."""
    from pydicom.pixels import apply_modality_lut

    bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
    signed = int(ds.get("PixelRepresentation") or 0) == 1
    stored = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1], np.int64)
    out = np.asarray(apply_modality_lut(stored, ds), np.float64)
    return float(out.min()), float(out.max())


def _to_uint8(windowed: np.ndarray, output_range: np.ndarray, monochrome1: bool) -> np.ndarray:
    lo, hi = float(output_range[0]), float(output_range[1])
    unit = (np.asarray(windowed, np.float64) - lo) / (hi - lo if hi != lo else 1.0)
    unit = np.clip(unit, 0.0, 1.0)
    if monochrome1:
        unit = 1.0 - unit
    return np.rint(unit * 255.0).astype(np.uint8)


def to_gray_colour(ds, stored: np.ndarray) -> np.ndarray:
    """A colour DICOM (RGB, YBR, palette; secondary captures) as 8/16-bit luminance."""
    import cv2
    from pydicom.pixels import apply_color_lut

    rgb = apply_color_lut(stored, ds) if ds.PhotometricInterpretation == "PALETTE COLOR" else stored
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise DicomError(f"unsupported DICOM pixel layout {rgb.shape} ({ds.PhotometricInterpretation})")
    if rgb.dtype not in (np.uint8, np.uint16):
        rgb = np.clip(rgb, 0, 65535).astype(np.uint16)
    return cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY)


def _text(value) -> str | None:
    """An element's value as text; a multi-valued one (PatientID "A\\B") as DICOM writes it, not a list repr."""
    from pydicom.multival import MultiValue

    if value is None:
        return None
    text = ("\\".join(str(v) for v in value) if isinstance(value, (MultiValue, list, tuple)) else str(value)).strip()
    return text or None


def _view_code(ds) -> str | None:
    seq = ds.get("ViewCodeSequence")
    if seq:
        return _text(seq[0].get("CodeMeaning"))
    return None


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

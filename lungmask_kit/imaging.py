"""Image decoding, model-input preparation and PNG encoding.

Shape contract: a decoded image is a 2-D array (H, W) of uint8 or uint16 -- grayscale at the file's native
bit depth. Colour (RGB, RGBA, palette, CMYK) is converted to luminance; EXIF orientation is applied. DICOM files
(recognised by their preamble, or forced) are decoded by `dicom.py`, which also gives the windowed view the
model sees and the header's manifest columns.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field

import numpy as np

from lungmask_kit import defaults
from lungmask_kit.dicom import is_dicom
from lungmask_kit.discovery import wants_dicom
from lungmask_kit.fileio import InputReadError, read_regular_file

# OpenCV refuses images above this many pixels itself; keep it at our limit (read on first decode).
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(defaults.MAX_IMAGE_PIXELS))
import cv2  # noqa: E402

from lungmask_kit import dicom


class ImageDecodeError(ValueError):
    """The file is not a usable image; the message says why. `header`: a DICOM's manifest columns, where the
    header could be read before the image failed."""

    def __init__(self, message: str, header: dict | None = None):
        super().__init__(message)
        self.header = header or {}


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # (H, W) uint8 or uint16: what the outputs keep
    source_channels: int  # colour channels decoded: 1 gray or 3 colour (alpha is dropped)
    windowed: np.ndarray | None = None  # (H, W) uint8: a DICOM's VOI LUT / window applied, for the model
    header: dict = field(default_factory=dict)  # a DICOM's manifest columns (dicom.HEADER_COLUMNS)

    @property
    def bit_depth(self) -> int:
        return 16 if self.pixels.dtype == np.uint16 else 8

    @property
    def model_view(self) -> np.ndarray:
        """The image the model sees: the windowed DICOM where there is one, else the pixels."""
        return self.pixels if self.windowed is None else self.windowed


def _declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG or JPEG header without decoding, to refuse decompression bombs early."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return struct.unpack(">II", data[16:24])
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF):
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return w, h
            i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return None


def _png_complete(data: bytes) -> bool:
    """Whether the PNG's chunks run intact up to IEND (bytes after IEND, as some writers append, are fine)."""
    i = 8
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i:i + 4])[0]
        if data[i + 4:i + 8] == b"IEND":
            return True
        i += 12 + length
    return False


def _jpeg_complete(data: bytes) -> bool:
    """Whether the JPEG has an end-of-image marker after its first scan (trailers after it are fine; an EXIF
    thumbnail's own marker, before the scan, does not count)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:
            return True
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xDA:  # start of scan: entropy-coded data stuffs 0xFF as FF00, so FFD9 is the end
            return data.find(b"\xff\xd9", i + 2 + length) >= 0
        i += 2 + length
    return False


def _without_icc_profile(data: bytes) -> bytes:
    """PNG bytes without their iCCP chunk. OpenCV ignores colour profiles, but libpng prints a warning line
    for each odd one (an RGB profile on a grayscale image is common in exported CXRs): thousands of lines on
    a real corpus. Dropping the chunk before decoding changes no pixel."""
    i, kept, found = 8, [data[:8]], False
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i:i + 4])[0]
        end = i + 12 + length
        if data[i + 4:i + 8] == b"iCCP":
            found = True
        else:
            kept.append(data[i:end])
        if data[i + 4:i + 8] == b"IEND":
            break
        i = end
    return b"".join(kept) if found else data


def _check_complete(data: bytes) -> None:
    # libpng/libjpeg decode truncated files into half-grey images with only a warning: refuse them.
    if data[:8] == b"\x89PNG\r\n\x1a\n" and not _png_complete(data):
        raise ImageDecodeError("truncated PNG (no IEND chunk)")
    if data[:2] == b"\xff\xd8" and not _jpeg_complete(data):
        raise ImageDecodeError("truncated JPEG (no end-of-image marker)")


def check_encoded(data: bytes, max_pixels: int = defaults.MAX_IMAGE_PIXELS) -> None:
    """What is refused before any decoder sees a PNG or JPEG: a declared size over `max_pixels` (a
    decompression bomb) and a truncated file. Raises ImageDecodeError."""
    size = _declared_size(data)
    if size is not None and size[0] * size[1] > max_pixels:
        raise ImageDecodeError(f"image too large: declared {size[0]}x{size[1]} exceeds {max_pixels} pixels")
    _check_complete(data)


def decode_image(data: bytes, max_pixels: int = defaults.MAX_IMAGE_PIXELS, dicom: bool = False) -> DecodedImage:
    """Decode file bytes to grayscale at native bit depth. Raises ImageDecodeError with a clear reason.
    DICOM is recognised by its preamble; `dicom` also reads files without one (named .dcm, or --dicom)."""
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if dicom or is_dicom(data):
        return decode_dicom(data, max_pixels, force=not is_dicom(data))
    check_encoded(data, max_pixels)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and b"iCCP" in data[:1 << 16]:
        data = _without_icc_profile(data)
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        # ANYDEPTH|ANYCOLOR keeps 16-bit and applies EXIF orientation (IMREAD_UNCHANGED would not).
        img = cv2.imdecode(buf, cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
    except cv2.error as err:
        raise ImageDecodeError(f"cannot decode image: {str(err).strip().splitlines()[-1]}") from err
    if img is None:
        raise ImageDecodeError("not a decodable image (unknown format or corrupt data)")
    if img.size == 0:
        raise ImageDecodeError("image has no pixels")
    if img.shape[0] * img.shape[1] > max_pixels:
        raise ImageDecodeError(f"image too large: {img.shape[1]}x{img.shape[0]} exceeds {max_pixels} pixels")
    channels = 1 if img.ndim == 2 else img.shape[2]
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageDecodeError(f"unsupported pixel type {img.dtype} (8- or 16-bit integer images only)")
    if channels == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    elif channels != 1:
        raise ImageDecodeError(f"unsupported channel count {channels}")
    return DecodedImage(np.ascontiguousarray(img), channels)


def decode_dicom(data: bytes, max_pixels: int = defaults.MAX_IMAGE_PIXELS, force: bool = False) -> DecodedImage:
    """A DICOM radiograph -> DecodedImage with its windowed view and header columns (see dicom.py)."""

    header: dict = {}
    try:
        ds = dicom.read_dataset(data, force)
        header = dicom.header_columns(ds)
        dicom.check_single_image(ds, max_pixels)
        stored = dicom.decode_pixels(ds)
        if ds.get("PhotometricInterpretation") in ("MONOCHROME1", "MONOCHROME2"):
            if stored.ndim != 2:
                raise dicom.DicomError(f"unsupported DICOM pixel layout {stored.shape} (one 2-D image expected)")
            pixels, windowed = dicom.presentation(ds, stored)
            return DecodedImage(pixels, 1, windowed, header)
        return DecodedImage(dicom.to_gray_colour(ds, stored), 3, None, header)
    except dicom.DicomError as err:
        raise ImageDecodeError(str(err), header) from err


class InputChangedError(InputReadError):
    """The file is not the one a run recorded (its sha256 differs)."""


def read_checked(path: str | os.PathLike, expect_sha256: str | None = None,
                 max_bytes: int = defaults.MAX_FILE_BYTES) -> bytes:
    """The bytes of one file, read the one way lungkit reads an image, mask or variant: a regular file only (a
    FIFO or a device is refused, never opened to block), at most `max_bytes`, and, where a run recorded it, the
    same file (`expect_sha256`). Raises InputReadError (an OSError)."""
    data = read_regular_file(path, max_bytes)
    if expect_sha256 and hashlib.sha256(data).hexdigest() != expect_sha256:
        raise InputChangedError("not the file the run read (sha256 differs): changed or replaced since")
    return data


def read_input(path: str | os.PathLike, dicom: bool = False, expect_sha256: str | None = None,
               max_bytes: int = defaults.MAX_FILE_BYTES) -> tuple[bytes, DecodedImage]:
    """(bytes, decoded image) of one file read by `read_checked`. Raises InputReadError or ImageDecodeError."""
    data = read_checked(path, expect_sha256, max_bytes)
    return data, decode_image(data, dicom=dicom)


def read_decoded(path: str | os.PathLike) -> DecodedImage:
    return read_input(path, dicom=wants_dicom(str(path)))[1]


def read_gray(path: str | os.PathLike) -> np.ndarray:
    """The pixels an image's outputs keep (a mask, a variant, a classifier's input)."""
    return read_decoded(path).pixels


def read_model_view(path: str | os.PathLike) -> np.ndarray:
    """The image as the segmenter sees it (a DICOM's window applied): for training, calibration and stats."""
    return read_decoded(path).model_view


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """(H, W) uint8/uint16 -> float32 in [0, 1].

    8-bit divides by 255. 16-bit CXRs rarely use all 16 bits (10-14 bit detectors), so they are stretched
    by their own min/max to resemble the 8-bit images the model saw in training.
    """
    if pixels.dtype == np.uint8:
        return pixels.astype(np.float32) * (1.0 / 255.0)
    lo, hi = float(pixels.min()), float(pixels.max())
    return (pixels.astype(np.float32) - lo) * (1.0 / max(hi - lo, 1.0))


def prepare_input(pixels: np.ndarray, size: int, mean, std, in_channels: int) -> np.ndarray:
    """(H, W) image -> (C, size, size) float32 normalised model input."""
    small = cv2.resize(pixels, (size, size), interpolation=cv2.INTER_AREA)
    x = to_unit_range(small)
    mean = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
    x = np.broadcast_to(x, (in_channels, size, size))
    return ((x - mean) / std).astype(np.float32, copy=False)


def encode_png(pixels: np.ndarray) -> bytes:
    # opencv's default PNG parameters encode fastest here (explicit levels were ~3x slower, no smaller).
    ok, buf = cv2.imencode(".png", pixels)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()

"""Mask overlays for the QC pages: pure functions on arrays.

Shape contract: `image` (H, W) uint8 or uint16, `mask` (H, W) bool, or uint8 lung labels (postprocess: 1 the
patient's right lung, 2 the left), or None; `heart` (H, W) bool or None; outputs are (h, w, 3) uint8 BGR, scaled so that the longest side is
at most `max_side`. Inputs are never mutated.
"""

from __future__ import annotations

import cv2
import numpy as np

TINT_BGR = np.array([80, 200, 60], np.float32)  # green lungs (a mask without sides)
# the patient's right lung blue, the left orange: apart for colour-blind readers too
SIDE_TINTS_BGR = {1: np.array([230, 140, 30], np.float32), 2: np.array([20, 140, 250], np.float32)}
OUTLINE_BGR = (0, 230, 255)  # yellow outline, visible on dark and bright film
HEART_TINT_BGR = np.array([160, 40, 200], np.float32)  # the heart magenta, apart from both lungs' tints
HEART_OUTLINE_BGR = (200, 80, 255)


def to_display(image: np.ndarray) -> np.ndarray:
    """(H, W) uint8/uint16 -> uint8 for viewing: 16-bit stretched by its own min/max, as the model sees it."""
    if image.dtype == np.uint8:
        return image
    lo, hi = float(image.min()), float(image.max())
    return np.rint((image.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1.0))).astype(np.uint8)


def scaled_size(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(width, height) with the longest side at most `max_side`, aspect kept (never enlarged)."""
    h, w = shape
    scale = min(1.0, max_side / max(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))


def overlay(image: np.ndarray, mask: np.ndarray | None, max_side: int, alpha: float = 0.28,
            heart: np.ndarray | None = None) -> np.ndarray:
    """The image with the lungs (and the heart) tinted and outlined; without a mask, the image alone."""
    size = scaled_size(image.shape, max_side)
    gray = cv2.resize(to_display(image), size, interpolation=cv2.INTER_AREA)
    bgr = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    if mask is None:
        return bgr
    if mask.shape != image.shape or (heart is not None and heart.shape != image.shape):
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    labels = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
    small = labels > 0
    tints = SIDE_TINTS_BGR if mask.dtype == np.uint8 else {1: TINT_BGR}
    tinted = bgr.astype(np.float32)
    for value, tint in tints.items():
        where = labels == value
        tinted[where] = (1 - alpha) * tinted[where] + alpha * tint
    small_heart = None
    if heart is not None:
        small_heart = cv2.resize(heart.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
        tinted[small_heart] = (1 - alpha) * tinted[small_heart] + alpha * HEART_TINT_BGR
    out = np.rint(tinted).astype(np.uint8)
    width = max(1, round(max(size) / 300))
    contours, _ = cv2.findContours(small.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(out, contours, -1, OUTLINE_BGR, width, cv2.LINE_AA)
    if small_heart is not None:
        contours, _ = cv2.findContours(small_heart.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, HEART_OUTLINE_BGR, width, cv2.LINE_AA)
    return out


def encode_jpeg(bgr: np.ndarray, quality: int = 85) -> bytes:
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes()

"""The heart and the cardiothoracic ratio (CTR): pure functions on arrays, inputs never mutated.

Shape contract: probabilities are (h, w) float in [0, 1] at model resolution; masks are (H, W) bool. The CTR
follows cxr-heart's (Wingspan's) definition: the heart's widest horizontal extent divided by the widest
horizontal extent of the two visible (jsrt-convention) lungs together, both at the image's native size. It is
a ratio of bounding widths, not the (MRD + MLD) / internal thoracic diameter of some other tools.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from lungmask_kit import rle
from lungmask_kit.postprocess import LEFT_LUNG, RIGHT_LUNG, keep_largest_components


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) bool with every background region that does not reach the border filled."""
    padded = np.pad(mask.astype(np.uint8), 1)
    outside = padded.copy()
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), np.uint8)
    cv2.floodFill(outside, flood, (0, 0), 2)
    return (outside != 2)[1:-1, 1:-1]


def finish_heart(probability: np.ndarray, threshold: float) -> np.ndarray:
    """(h, w) heart probability -> (h, w) bool: thresholded, its largest component only, holes filled (a heart
    is one solid organ; the lungs' small-object and hole sizes do not apply)."""
    return fill_holes(keep_largest_components(probability >= threshold, 1))


def widest_extent(mask: np.ndarray) -> int | None:
    """Pixels between the leftmost and the rightmost column of the mask, both included; None when empty."""
    columns = np.flatnonzero(mask.any(axis=0))
    return int(columns[-1] - columns[0] + 1) if columns.size else None


def native_columns(mask: np.ndarray, width: int) -> np.ndarray:
    """(h, w) bool at model resolution -> (h, width) bool, scaled horizontally only, by the rule
    `postprocess.resize_mask` scales masks (bilinear, then half): its widest extent is that of the native-size
    mask to within a pixel, at a small part of the cost of drawing the native mask (only a width is wanted)."""
    up = cv2.resize(mask.astype(np.uint8) * 255, (width, mask.shape[0]), interpolation=cv2.INTER_LINEAR)
    return up >= 128


@dataclass(frozen=True)
class NativeHeart:
    """A heart mask at native size, held as the window around it: `mask` (H, W) bool is empty outside
    `window` ((h, w) bool at `top`, `left`), so its measures and its RLE come from the window alone."""

    mask: np.ndarray
    window: np.ndarray
    top: int
    left: int


def heart_at_native(small: np.ndarray, shape: tuple[int, int]) -> NativeHeart:
    """(h, w) bool heart at model resolution -> native (H, W), by the rule `postprocess.resize_mask` uses
    (bilinear on 0/255, then half), interpolated only over the native window its bilinear support reaches: the
    rest of the image is background whatever the rule (a tenth of the cost of resizing the whole mask). OpenCV's
    warpAffine weighs neighbours in other fixed-point steps than its resize, so a few edge pixels may differ from
    `resize_mask`'s (measured: 4 of a heart's tens of thousands on average)."""
    height, width = shape
    mask = np.zeros(shape, bool)
    rows, cols = np.flatnonzero(small.any(axis=1)), np.flatnonzero(small.any(axis=0))
    if not rows.size:
        return NativeHeart(mask, mask[:0, :0], 0, 0)
    sy, sx = height / small.shape[0], width / small.shape[1]
    # native pixel X samples the small mask at (X + 0.5) / sx - 0.5: outside [c0 - 1, c1 + 1] it samples zeros
    y0, y1 = max(int(np.floor((rows[0] - 0.5) * sy)) - 1, 0), min(int(np.ceil((rows[-1] + 1.5) * sy)) + 1, height)
    x0, x1 = max(int(np.floor((cols[0] - 0.5) * sx)) - 1, 0), min(int(np.ceil((cols[-1] + 1.5) * sx)) + 1, width)
    inverse = np.array([[1 / sx, 0, (x0 + 0.5) / sx - 0.5], [0, 1 / sy, (y0 + 0.5) / sy - 0.5]])
    up = cv2.warpAffine(small.astype(np.uint8) * 255, inverse, (x1 - x0, y1 - y0),
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    mask[y0:y1, x0:x1] = up >= 128
    return NativeHeart(mask, mask[y0:y1, x0:x1], y0, x0)


def heart_fields(heart: np.ndarray | NativeHeart, pixel_spacing: list[float] | None = None) -> dict:
    """The manifest's heart fields of an (H, W) bool heart mask at native size (or a `NativeHeart`)."""
    if not isinstance(heart, NativeHeart):
        heart = NativeHeart(heart, heart, 0, 0)
    count = int(np.count_nonzero(heart.window))
    size = heart.mask.size
    pixel_mm2 = None
    if pixel_spacing and len(pixel_spacing) == 2 and all(v and v > 0 for v in pixel_spacing):
        pixel_mm2 = float(pixel_spacing[0]) * float(pixel_spacing[1])
    return {
        "heart_rle": rle.encode_window(heart.window, heart.top, heart.left, heart.mask.shape),
        "heart_fraction": round(count / size, 6) if size else 0.0,
        "heart_mm2": None if pixel_mm2 is None else round(count * pixel_mm2, 2),
        "heart_width_px": widest_extent(heart.window),
    }


# the least share of the heart's area on the patient's right of the midline between the lungs: half the smallest
# of cxr-heart's 258 annotated hearts (20%; median 35%)
MIN_RIGHT_SHARE = 0.10


def crosses_midline(heart: np.ndarray, sides: np.ndarray) -> bool:
    """Whether the heart (h, w) bool lies across the midline between the two lungs (lung labels of the same
    size: the mean of each lung's columns), with at least MIN_RIGHT_SHARE of its area on the patient's right (the
    image's left). A heart drawn inside the left lung field alone, what a model may do on an image unlike its
    training images, does not."""
    right_x, left_x = (np.nonzero(sides == label)[1] for label in (RIGHT_LUNG, LEFT_LUNG))
    area = np.count_nonzero(heart)
    if not right_x.size or not left_x.size or not area:
        return False
    midline = int(round((right_x.mean() + left_x.mean()) / 2))
    return np.count_nonzero(heart[:, :midline]) >= MIN_RIGHT_SHARE * area


def thorax_fields(visible_lungs: np.ndarray | None, sides: np.ndarray | None, heart: np.ndarray | None = None) -> dict:
    """`thorax_width_px` from the visible-lung mask at native width ((H or h, W) bool: only its columns count;
    `native_columns`) and the lung sides labelled at model
    resolution (`postprocess.lung_sides`), or None with the reason in `ctr_null_reason`: no visible-lung mask,
    one lung missing (a CTR over one lung would be about half the true one), or a heart (given at the sides'
    size) that does not cross the midline between the lungs (`crosses_midline`: its width would not be the
    heart's)."""
    if visible_lungs is None or sides is None:
        return {"thorax_width_px": None, "ctr_null_reason": "the model draws no visible-lung (jsrt) mask to measure the thorax on"}
    if not (sides == RIGHT_LUNG).any() or not (sides == LEFT_LUNG).any():
        return {"thorax_width_px": None, "ctr_null_reason": "a lung is missing from the visible-lung mask"}
    if heart is not None and heart.any() and not crosses_midline(heart, sides):
        return {"thorax_width_px": widest_extent(visible_lungs),
                "ctr_null_reason": "implausible heart: it does not cross the midline between the lungs"}
    return {"thorax_width_px": widest_extent(visible_lungs), "ctr_null_reason": None}


def cardiothoracic_ratio(heart_width_px: int | None, thorax_width_px: int | None) -> float | None:
    """Heart width / thorax width, rounded to 4 decimals; None when either is missing or the thorax is empty."""
    if not heart_width_px or not thorax_width_px:
        return None
    return round(heart_width_px / thorax_width_px, 4)

"""The heart and the cardiothoracic ratio (CTR): pure functions on arrays, inputs never mutated.

Shape contract: probabilities are (h, w) float in [0, 1] at model resolution; masks are (H, W) bool. The CTR
follows cxr-heart's (Wingspan's) definition: the heart's widest horizontal extent divided by the widest
horizontal extent of the two visible (jsrt-convention) lungs together, both at the image's native size. It is
a ratio of bounding widths, not the (MRD + MLD) / internal thoracic diameter of some other tools.
"""

from __future__ import annotations

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


def heart_fields(heart: np.ndarray, pixel_spacing: list[float] | None = None) -> dict:
    """The manifest's heart fields of an (H, W) bool heart mask at native size."""
    count = int(np.count_nonzero(heart))
    pixel_mm2 = None
    if pixel_spacing and len(pixel_spacing) == 2 and all(v and v > 0 for v in pixel_spacing):
        pixel_mm2 = float(pixel_spacing[0]) * float(pixel_spacing[1])
    return {
        "heart_rle": rle.encode(heart),
        "heart_fraction": round(count / heart.size, 6) if heart.size else 0.0,
        "heart_mm2": None if pixel_mm2 is None else round(count * pixel_mm2, 2),
        "heart_width_px": widest_extent(heart),
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
    """`thorax_width_px` from the native (H, W) bool visible-lung mask and the lung sides labelled at model
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

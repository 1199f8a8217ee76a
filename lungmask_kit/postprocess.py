"""Mask post-processing: pure functions on arrays, inputs never mutated.

Shape contract: probabilities are (H, W) float in [0, 1]; masks are (H, W) bool. Sizes are given in pixels
(`min_object_px`, `max_hole_px`); `area_px` turns a fraction of the image area into pixels. Morphology runs
at model resolution (256 px: ~1 ms) and the mask is then brought to the image's native size.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

from lungmask_kit import defaults


@dataclass(frozen=True)
class PostprocessSettings:
    threshold: float = defaults.THRESHOLD
    min_object_fraction: float = defaults.MIN_OBJECT_FRACTION
    max_hole_fraction: float = defaults.MAX_HOLE_FRACTION
    keep_largest: int = defaults.KEEP_LARGEST  # 0 keeps every component

    def as_dict(self) -> dict:
        return asdict(self)


def area_px(fraction: float, shape: tuple[int, int]) -> int:
    return int(round(fraction * shape[0] * shape[1]))


def _components(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
    n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    return n, labels, stats[:, cv2.CC_STAT_AREA]


def remove_small_objects(mask: np.ndarray, min_object_px: int) -> np.ndarray:
    """Drop 8-connected foreground components smaller than `min_object_px` (skimage semantics, cv2 speed)."""
    n, labels, areas = _components(mask)
    keep = areas >= min_object_px
    keep[0] = False
    return keep[labels]


def fill_small_holes(mask: np.ndarray, max_hole_px: int) -> np.ndarray:
    """Fill 4-connected background regions smaller than `max_hole_px` that do not touch the border."""
    background = ~mask.astype(bool)
    n, labels, stats, _ = cv2.connectedComponentsWithStats(background.astype(np.uint8), connectivity=4)
    h, w = mask.shape
    x, y, bw, bh = (stats[:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT))
    touches_border = (x == 0) | (y == 0) | (x + bw == w) | (y + bh == h)
    fill = (stats[:, cv2.CC_STAT_AREA] < max_hole_px) & ~touches_border
    fill[0] = False  # label 0 is the foreground here
    return mask.astype(bool) | fill[labels]


def keep_largest_components(mask: np.ndarray, k: int) -> np.ndarray:
    """Keep the `k` largest 8-connected components (k=2: the two lungs); k <= 0 keeps all."""
    n, labels, areas = _components(mask)
    if k <= 0 or n - 1 <= k:
        return mask.astype(bool).copy()
    order = np.argsort(areas[1:])[::-1][:k] + 1
    keep = np.zeros(n, dtype=bool)
    keep[order] = True
    return keep[labels]


def count_components(mask: np.ndarray) -> int:
    return _components(mask)[0] - 1


def lung_area_fraction(mask: np.ndarray) -> float:
    return float(np.count_nonzero(mask)) / mask.size if mask.size else 0.0


def clean_mask(probability: np.ndarray, settings: PostprocessSettings) -> np.ndarray:
    """(H, W) probability -> (H, W) bool: threshold, drop small objects, fill small holes, keep largest."""
    mask = probability >= settings.threshold
    shape = mask.shape
    mask = remove_small_objects(mask, area_px(settings.min_object_fraction, shape))
    mask = fill_small_holes(mask, area_px(settings.max_hole_fraction, shape))
    if settings.keep_largest > 0:
        mask = keep_largest_components(mask, settings.keep_largest)
    return mask


def resize_mask(mask: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """(h, w) bool -> (H, W) bool. Bilinear then threshold at half, so upscaled edges stay smooth
    instead of the staircase nearest-neighbour gives at 8x."""
    h, w = size_hw
    if mask.shape == (h, w):
        return mask.astype(bool).copy()
    up = cv2.resize(mask.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR)
    return up >= 128

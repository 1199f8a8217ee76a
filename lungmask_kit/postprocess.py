"""Mask post-processing: pure functions on arrays, inputs never mutated.

Shape contract: probabilities are (H, W) float in [0, 1]; masks are (H, W) bool; lung labels are (H, W) uint8
(0 background, `RIGHT_LUNG`, `LEFT_LUNG`). Sizes are given in pixels (`min_object_px`, `max_hole_px`);
`area_px` turns a fraction of the image area into pixels. Morphology runs at model resolution (256 px: ~1 ms)
and the mask is then brought to the image's native size.
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


# The patient's right lung lies on the image's left in a PA or AP view (radiological convention).
RIGHT_LUNG, LEFT_LUNG = 1, 2
_VALLEY_DEPTH = 0.5  # the mediastinum's column count is under half the narrower lung's peak
_MIN_SIDE_SHARE = 0.1  # each lung holds at least this share of the mask
_WHOLE_SHARE = 0.9  # a component with this share of its pixels on one side belongs to that side whole
_APART = 0.25  # two large components whose centres are this share of the mask's width apart are two lungs


def _midline(mask: np.ndarray) -> int | None:
    """The column between two lungs: the emptiest column of the mask's middle half (its column profile's
    valley), or None when the profile has no valley, i.e. one lung."""
    profile = np.count_nonzero(mask, axis=0)
    cols = np.flatnonzero(profile)
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    lo, hi = x0 + (x1 - x0) // 4, x0 + 3 * (x1 - x0) // 4
    if hi - lo < 1:
        return None
    window = profile[lo:hi]
    candidates = np.flatnonzero(window == window.min()) + lo
    cut = int(candidates[np.argmin(np.abs(candidates - (lo + hi) / 2))])  # of equal columns, the most central
    left_peak, right_peak = profile[:cut].max(initial=0), profile[cut + 1:].max(initial=0)
    total = profile.sum()
    if profile[cut] > _VALLEY_DEPTH * min(left_peak, right_peak):
        return None
    if min(profile[:cut].sum(), profile[cut:].sum()) < _MIN_SIDE_SHARE * total:
        return None
    return cut


def lung_sides(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool -> (H, W) uint8 labels: `RIGHT_LUNG` (image left), `LEFT_LUNG` (image right), 0 elsewhere.

    Every mask pixel gets exactly one side. Two large components set apart horizontally are the two lungs
    (however tilted); every other component goes to the nearer one's side. One large component is cut at the
    valley of the mask's column profile (lungs merged over the mediastinum), each smaller one going whole to
    the side it lies on; with no valley it is one lung, on the side of the image its centre lies."""
    mask = mask.astype(bool, copy=False)
    labels = np.zeros(mask.shape, np.uint8)
    if not mask.any():
        return labels
    n, components, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas, cx = stats[1:, cv2.CC_STAT_AREA], centroids[1:, 0]
    width = np.ptp(np.flatnonzero(mask.any(axis=0))) + 1
    big = np.flatnonzero(areas >= _MIN_SIDE_SHARE * areas.sum())
    big = big[np.argsort(-areas[big])][:2]
    if len(big) == 2 and abs(cx[big[0]] - cx[big[1]]) >= _APART * width:
        midline = cx[big].mean()
        side = np.where(cx < midline, RIGHT_LUNG, LEFT_LUNG).astype(np.uint8)
        labels[mask] = side[components[mask] - 1]
        return labels
    cut = _midline(mask)
    if cut is None:
        labels[mask] = RIGHT_LUNG if np.nonzero(mask)[1].mean() < mask.shape[1] / 2 else LEFT_LUNG
        return labels
    columns = np.broadcast_to(np.arange(mask.shape[1]) < cut, mask.shape)
    on_right = np.bincount(components[mask & columns], minlength=n) / np.maximum(np.bincount(components[mask], minlength=n), 1)
    side = np.where(columns, RIGHT_LUNG, LEFT_LUNG).astype(np.uint8)  # cut where a component crosses
    whole = np.where(on_right >= _WHOLE_SHARE, RIGHT_LUNG, np.where(on_right <= 1 - _WHOLE_SHARE, LEFT_LUNG, 0))
    labels[mask] = np.where(whole[components[mask]] > 0, whole[components[mask]], side[mask])
    return labels


def right_lung_region(labels: np.ndarray) -> np.ndarray:
    """(h, w) lung labels -> (h, w) bool: the pixels nearer the right lung than the left, background included,
    so that a mask drawn at another size can be split by it (`split_by_region`)."""
    right, left = labels == RIGHT_LUNG, labels == LEFT_LUNG
    if not left.any():
        return np.ones(labels.shape, bool)
    if not right.any():
        return np.zeros(labels.shape, bool)
    to_right = cv2.distanceTransform((~right).astype(np.uint8), cv2.DIST_L2, 3)
    to_left = cv2.distanceTransform((~left).astype(np.uint8), cv2.DIST_L2, 3)
    return to_right <= to_left


def split_by_region(mask: np.ndarray, right_region: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) bool mask, (h, w) bool region -> (right lung, left lung), (H, W) bool each: disjoint, and their
    union is exactly `mask` (the region is brought to (H, W) with nearest neighbour)."""
    h, w = mask.shape
    if right_region.shape != (h, w):
        right_region = cv2.resize(right_region.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST).astype(bool)
    mask = mask.astype(bool, copy=False)
    return mask & right_region, mask & ~right_region

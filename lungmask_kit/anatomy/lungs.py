"""The lungs as a structure: the finished mask at native size, its right and left lung, and the lung columns of a
manifest row, whether the mask comes from the network (`segment`) or was drawn before (`variants`).

Shape contract: a probability is (h, w) float in [0, 1] at model resolution; masks are (H, W) bool at the image's
native size. Pure functions; inputs never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lungmask_kit.derive import lung_fields
from lungmask_kit.postprocess import (
    LEFT_LUNG,
    RIGHT_LUNG,
    PostprocessSettings,
    clean_mask,
    count_components,
    lung_area_fraction,
    lung_sides,
    resize_mask,
    right_lung_region,
    split_by_region,
)


@dataclass(frozen=True)
class FinishedLungs:
    mask: np.ndarray  # (H, W) bool, both lungs
    right: np.ndarray  # (H, W) bool, the patient's right lung (on the image's left); right | left == mask
    left: np.ndarray
    components: int  # connected components of the mask where it was finished (model resolution for segment)

    def sides(self) -> np.ndarray:
        """(H, W) uint8 labels: RIGHT_LUNG, LEFT_LUNG, 0 elsewhere."""
        return np.where(self.right, RIGHT_LUNG, np.where(self.left, LEFT_LUNG, 0)).astype(np.uint8)


def lungs_from_probability(probability: np.ndarray, post: PostprocessSettings,
                           shape: tuple[int, int]) -> tuple[np.ndarray, FinishedLungs]:
    """The network's lungs: cleaned at model resolution (returned too: the quality model scores it) and brought
    to `shape`; the two lungs are told apart at model resolution and every native pixel takes its region's side."""
    small = clean_mask(probability, post)
    mask = resize_mask(small, shape)
    right, left = split_by_region(mask, right_lung_region(lung_sides(small)))
    return small, FinishedLungs(mask, right, left, count_components(small))


def lungs_from_mask(mask: np.ndarray) -> FinishedLungs:
    """A drawn (H, W) bool lung mask, split into its two lungs at its own size."""
    sides = lung_sides(mask)
    return FinishedLungs(mask, sides == RIGHT_LUNG, sides == LEFT_LUNG, count_components(mask))


def lung_columns(lungs: FinishedLungs, pixel_spacing: list[float] | None = None) -> dict:
    """The manifest's lung columns: each lung's RLE, share of the image and mm^2 (`derive.lung_fields`), the
    lungs' share of the image and their component count."""
    return {**lung_fields(lungs.right, lungs.left, pixel_spacing),
            "lung_area_fraction": round(lung_area_fraction(lungs.mask), 6), "n_components": lungs.components}

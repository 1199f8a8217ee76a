"""The derive step shared by `segment` and `variants`: lungs-only and lungs-removed images, and the right and
left lung of a mask as manifest fields.

Shape contract: image (H, W) uint8/uint16, mask (H, W) bool of the same shape. Outputs keep the image's
dtype; inputs are never mutated.
"""

from __future__ import annotations

import numpy as np

from lungmask_kit import rle

VARIANTS = ("lungs", "nolungs")


def derive_variants(image: np.ndarray, mask: np.ndarray, only: tuple[str, ...] = VARIANTS) -> dict[str, np.ndarray]:
    """lungs = image AND mask; nolungs = image AND NOT mask (pixels outside set to 0)."""
    if image.shape != mask.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    mask = mask.astype(bool, copy=False)
    zero = np.zeros((), dtype=image.dtype)
    out = {}
    if "lungs" in only:
        out["lungs"] = np.where(mask, image, zero)
    if "nolungs" in only:
        out["nolungs"] = np.where(mask, zero, image)
    return out


def lung_fields(right: np.ndarray, left: np.ndarray, pixel_spacing: list[float] | None = None) -> dict:
    """The per-lung manifest fields of two disjoint (H, W) bool masks: COCO RLEs, shares of the image area, and
    areas in mm^2 where the pixel spacing ([row, column] mm) is known (None otherwise)."""
    pixel_mm2 = None
    if pixel_spacing and len(pixel_spacing) == 2 and all(v and v > 0 for v in pixel_spacing):
        pixel_mm2 = float(pixel_spacing[0]) * float(pixel_spacing[1])
    fields = {}
    for name, lung in (("right", right), ("left", left)):
        count = int(np.count_nonzero(lung))
        fields[f"{name}_lung_rle"] = rle.encode(lung)
        fields[f"{name}_lung_fraction"] = round(count / lung.size, 6) if lung.size else 0.0
        fields[f"{name}_lung_mm2"] = None if pixel_mm2 is None else round(count * pixel_mm2, 2)
    return fields


def bounding_box(mask: np.ndarray, margin: int = 0) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1), half-open, of the mask's pixels grown by `margin` and clipped; None if empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    h, w = mask.shape
    return (
        max(int(rows[0]) - margin, 0),
        min(int(rows[-1]) + 1 + margin, h),
        max(int(cols[0]) - margin, 0),
        min(int(cols[-1]) + 1 + margin, w),
    )


# a mask's two most common values cover at least this share of it: anti-aliased edges of a small mask took 6%
# here; of 510 radiographs and photographs (cxr-cls, cxr-ood) the most a pair of values covered was 51%
MASK_EXTREME_SHARE = 0.8


def not_a_mask(pixels: np.ndarray) -> str | None:
    """Why an image is not a mask (None when it is one): a mask has two values, a colour-mapped one two colours'
    luminances, an anti-aliased one a few more along its edges; a photograph or a radiograph has many."""
    if pixels.ndim != 2:
        return f"not a 2-D mask (shape {pixels.shape})"
    counts = np.sort(np.bincount(pixels.ravel()) if pixels.dtype.kind == "u" and pixels.dtype.itemsize <= 2
                     else np.unique(pixels, return_counts=True)[1])
    share = counts[-2:].sum() / pixels.size
    if share < MASK_EXTREME_SHARE:
        return (f"not a binary mask: its two most common values cover {share:.0%} of its pixels (a mask's cover "
                f"{MASK_EXTREME_SHARE:.0%} or more)")
    return None


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """Any mask file's pixels -> bool, by one documented rule.

    - 2-D 0/1 or 0/255 (or 0/65535): non-zero is lung.
    - anti-aliased grayscale (many levels): lung where value >= half the maximum value present.
    - colour / colormapped (the original code saved masks with a colormap): decoded to luminance first by
      the reader; then the background is the most common value on the image border, and lung is every
      pixel that differs from it by more than a quarter of the value range.
    """
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    values = np.unique(mask)
    if values.size <= 2 and values[0] == 0:
        return mask != 0
    border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    bg_vals, counts = np.unique(border, return_counts=True)
    background = bg_vals[np.argmax(counts)]
    if values.size <= 2:  # two values, neither zero (e.g. colormapped): background from the border
        return mask != background
    if background == values[0]:  # anti-aliased dark background
        return mask >= (int(values[0]) + int(values[-1]) + 1) // 2
    span = int(values[-1]) - int(values[0])
    return np.abs(mask.astype(np.int64) - int(background)) > span / 4

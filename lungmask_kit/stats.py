"""Dataset intensity statistics (mean/std of pixels scaled to [0, 1]) at model resolution."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def pixel_mean_std(images: Iterable[np.ndarray]) -> tuple[float, float, int]:
    """Images in [0, 1] (any shape) -> (mean, std, n_images), exact over all pixels (float64 sums)."""
    total = total_sq = 0.0
    count = n = 0
    for x in images:
        x = np.asarray(x, dtype=np.float64)
        total += float(x.sum())
        total_sq += float(np.square(x).sum())
        count += x.size
        n += 1
    if count == 0:
        raise ValueError("no images to compute statistics on")
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0))), n

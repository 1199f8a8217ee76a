"""Dataset intensity statistics (mean/std of pixels scaled to [0, 1]) at model resolution."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm.auto import tqdm

from lungmask_kit import defaults
from lungmask_kit.discovery import find_images, wants_dicom
from lungmask_kit.errors import LungkitError, NoImagesError
from lungmask_kit.fileio import InputReadError
from lungmask_kit.imaging import ImageDecodeError, read_input, to_unit_range


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


@dataclass
class DatasetStats:
    mean: float
    std: float
    n_images: int
    size: int
    skipped: list[str] = field(default_factory=list)  # "path: reason" of images that could not be read

    def as_dict(self) -> dict:
        return {"mean": round(self.mean, 6), "std": round(self.std, 6), "n_images": self.n_images,
                "n_skipped": len(self.skipped), "size": self.size}


def dataset_stats(input_dir: str | Path, size: int = defaults.INPUT_SIZE, glob: str | None = None, dicom: bool = False,
                  progress: bool = True) -> DatasetStats:
    """`lungkit stats`: pixel mean/std over a folder, each image resized to size x size and scaled to [0, 1]
    exactly as the segmenter prepares it (a DICOM's window applied). Unreadable images are skipped and listed."""

    root = Path(input_dir)
    if not root.is_dir():
        raise LungkitError(f"input folder not found: {root}")
    rels = find_images(root, glob, dicom)
    if not rels:
        raise NoImagesError(f"no images found under {root}" + (f" matching {glob!r}" if glob else ""))
    skipped: list[str] = []

    def images():
        for rel in tqdm(rels, disable=not progress, unit="img"):
            try:
                view = read_input(root / rel, dicom=wants_dicom(rel, dicom))[1].model_view
            except (InputReadError, ImageDecodeError) as err:
                skipped.append(f"{rel}: {err}")
                continue
            yield to_unit_range(cv2.resize(view, (size, size), interpolation=cv2.INTER_AREA))

    try:
        mean, std, n = pixel_mean_std(images())
    except ValueError as err:  # every image was unreadable
        raise NoImagesError(f"no readable images under {root} ({len(skipped)} skipped, e.g. {skipped[0]})") from err
    return DatasetStats(mean, std, n, size, skipped)

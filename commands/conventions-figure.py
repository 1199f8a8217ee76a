#!/usr/bin/env python
"""The README's picture of the two annotation conventions on one bundled example image.

Segments the image in both conventions with the bundled model (`lungkit segment --convention v7|jsrt`) and
draws, side by side: the v7 mask's two lungs tinted apart (the patient's right lung blue, the left orange),
the jsrt mask the same way, and both outlines on the image (v7 yellow, jsrt magenta): the band between them
is the lung behind the heart and below the dome that only v7 includes.

Usage: python commands/conventions-figure.py [IMAGE] [OUT.png]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq

from lungmask_kit import rle
from lungmask_kit.postprocess import LEFT_LUNG, RIGHT_LUNG
from lungmask_kit.report.overlay import overlay, scaled_size, to_display
from lungmask_kit.segment import SegmentOptions, run_segment

REPO = Path(__file__).resolve().parents[1]
SIDE = 520


def sides(out: Path) -> np.ndarray:
    row = pq.read_table(out / "manifest.parquet").to_pylist()[0]
    labels = np.zeros((row["height"], row["width"]), np.uint8)
    labels[rle.decode(row["right_lung_rle"])] = RIGHT_LUNG
    labels[rle.decode(row["left_lung_rle"])] = LEFT_LUNG
    return labels


def outlines(image: np.ndarray, masks: dict[tuple[int, int, int], np.ndarray]) -> np.ndarray:
    size = scaled_size(image.shape, SIDE)
    out = cv2.cvtColor(cv2.resize(to_display(image), size, interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    for colour, mask in masks.items():
        small = cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, colour, 2, cv2.LINE_AA)
    return out


def caption(panel: np.ndarray, text: str) -> np.ndarray:
    bar = np.full((34, panel.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, text, (8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
    return np.vstack([panel, bar])


def main() -> None:
    image_path = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "examples/cxr-sample/images/ieee_2cd63b76.png"
    target = Path(sys.argv[2]) if len(sys.argv) > 2 else REPO / "examples/conventions.png"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        shutil.copy(image_path, src / image_path.name)
        labels = {}
        for convention in ("v7", "jsrt"):
            out = Path(tmp) / convention
            run_segment(src, out, SegmentOptions(convention=convention, progress=False))
            labels[convention] = sides(out)
    image = cv2.imread(str(image_path), cv2.IMREAD_GRAYSCALE)
    panels = [caption(overlay(image, labels["v7"], SIDE, alpha=0.4), "v7: whole lung (behind the heart too)"),
              caption(overlay(image, labels["jsrt"], SIDE, alpha=0.4), "jsrt: visible lung fields"),
              caption(outlines(image, {(0, 230, 255): labels["v7"] > 0, (255, 0, 255): labels["jsrt"] > 0}),
                      "outlines: v7 yellow, jsrt magenta")]
    figure = np.hstack([np.pad(p, ((0, 0), (4, 4), (0, 0)), constant_values=255) for p in panels])
    cv2.imwrite(str(target), figure, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"written {target} ({target.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()

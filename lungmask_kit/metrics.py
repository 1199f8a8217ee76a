"""Segmentation metrics per image (Dice, IoU, HD95) and classification metrics.

Shape contract: masks are (H, W) arrays, non-zero = lung, prediction and truth of the same shape.
"""

from __future__ import annotations

import math

import cv2
import numpy as np


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else 2.0 * float(np.logical_and(p, t).sum()) / float(denom)


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    p, t = pred.astype(bool), truth.astype(bool)
    union = np.logical_or(p, t).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, t).sum()) / float(union)


def _boundary(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.uint8)
    return m.astype(bool) & ~cv2.erode(m, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_CONSTANT, borderValue=0).astype(bool)


def hd95(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float] | None = None) -> float:
    """95th percentile symmetric Hausdorff distance between mask boundaries: in pixels, or in mm with
    `spacing` = (row, column) pixel spacing in mm (a DICOM's PixelSpacing; anisotropic ones included).

    Each direction's 95th percentile of boundary-to-boundary distances, then the larger (the usual
    definition, as in MONAI). Both empty: 0. One empty: NaN (undefined).
    """
    bp, bt = _boundary(pred), _boundary(truth)
    if not bp.any() and not bt.any():
        return 0.0
    if not bp.any() or not bt.any():
        return math.nan
    # distance of every pixel to the nearest boundary pixel of the other mask
    dist_to_t, dist_to_p = _distance_to(bt, spacing), _distance_to(bp, spacing)
    return float(max(np.percentile(dist_to_t[bp], 95), np.percentile(dist_to_p[bt], 95)))


def _distance_to(boundary: np.ndarray, spacing: tuple[float, float] | None) -> np.ndarray:
    if spacing is None or spacing[0] == spacing[1]:
        dist = cv2.distanceTransform((~boundary).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        return dist if spacing is None else dist * float(spacing[0])
    from scipy.ndimage import distance_transform_edt

    return distance_transform_edt(~boundary, sampling=spacing)


def binary_classification_metrics(labels, probabilities, threshold: float = 0.5) -> dict:
    """labels in {0, 1} (1 = positive), probabilities in [0, 1] -> the study's metrics and ROC AUC."""
    y = np.asarray(labels, dtype=int)
    prob = np.asarray(probabilities, dtype=float)
    pred = (prob >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())

    def ratio(a, b):
        return a / b if b else 0.0

    sensitivity = ratio(tp, tp + fn)
    precision = ratio(tp, tp + fp)
    return {
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": sensitivity,
        "specificity": ratio(tn, tn + fp),
        "precision": precision,
        "recall": sensitivity,
        "f1": ratio(2 * precision * sensitivity, precision + sensitivity),
        "roc_auc": roc_auc(y, prob),
        "confusion_matrix": [[tn, fp], [fn, tp]],
        "threshold": threshold,
        "n": int(len(y)),
    }


def roc_curve(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rates, true positive rates) over every distinct score threshold, from (0,0) to (1,1)."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=float)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    pos, neg = max(int(y.sum()), 1), max(int(len(y) - y.sum()), 1)
    return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos]


def roc_auc(labels, scores) -> float | None:
    """Area under the ROC curve (trapezoids; ties handled); None when only one class is present."""
    y = np.asarray(labels, dtype=int)
    if y.min(initial=0) == y.max(initial=0) or len(np.unique(y)) < 2:
        return None
    fpr, tpr = roc_curve(y, scores)
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 names it trapz
    return float(trapezoid(tpr, fpr))

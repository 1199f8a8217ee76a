"""`lungkit evaluate`: per-image Dice, IoU and HD95 of predicted masks against ground truth."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from lungmask_kit import chexmask, rle
from lungmask_kit.derive import binarize_mask, not_a_mask
from lungmask_kit.discovery import find_images, stem_key
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import OutsidePathError, atomic_write_bytes, make_dirs, output_errors
from lungmask_kit.imaging import ImageDecodeError, read_gray
from lungmask_kit.manifest import MANIFEST_NAME, open_run, write_table
from lungmask_kit.metrics import dice, hd95, iou
from lungmask_kit.postprocess import LEFT_LUNG, RIGHT_LUNG, lung_sides

METRICS = ("dice", "iou", "hd95_px", "hd95_mm", "dice_right_lung", "dice_left_lung")
FIELDS = [
    pa.field("path", pa.string()),
    pa.field("pred_mask", pa.string()),
    pa.field("truth_mask", pa.string()),
    pa.field("dice", pa.float64()),
    pa.field("iou", pa.float64()),
    pa.field("hd95_px", pa.float64()),
    pa.field("hd95_mm", pa.float64()),  # where the manifest knows the pixel spacing (a DICOM's)
    # each lung against the truth's lung on the same side (both split by postprocess.lung_sides, or the
    # prediction's right_lung_rle / left_lung_rle where its manifest has them)
    pa.field("dice_right_lung", pa.float64()),
    pa.field("dice_left_lung", pa.float64()),
    pa.field("est_dice", pa.float64()),
    pa.field("status", pa.string()),
    pa.field("error", pa.string()),
]


@dataclass
class Predictions:
    """Predicted masks keyed by relative image path without extension."""

    masks: dict[str, Path]
    paths: dict[str, str]  # the row's path as written
    est_dice: dict[str, float] = field(default_factory=dict)
    sides: dict[str, tuple[dict, dict]] = field(default_factory=dict)  # (right, left) lung RLEs
    convention: str | None = None  # what the masks outline, where the manifest says
    refused: dict[str, str] = field(default_factory=dict)  # masks not read: why (a path out of the run)
    spacing: dict[str, tuple[float, float]] = field(default_factory=dict)  # (row, column) mm per pixel


def _predictions(pred: Path) -> Predictions:
    """The predictions of a manifest or a folder (a folder has no est_dice, lung sides or convention)."""
    if pred.is_dir() and (pred / MANIFEST_NAME).is_file():  # a run folder: its manifest says where its masks are
        pred = pred / MANIFEST_NAME
    if pred.is_file() and pred.suffix == ".parquet":
        wanted = ("path", "status", "mask_path", "est_dice", "convention", "right_lung_rle", "left_lung_rle", "pixel_spacing")
        # a damaged or foreign file is one line, not a traceback
        run = open_run(pred, columns=wanted)
        meta = run.meta
        ok = [r for r in run.table.to_pylist() if r["status"] == "ok" and r.get("mask_path")]
        # a segment manifest's masks lie beside it, a variants manifest's where its masks_root says; a path that
        # would lead out of that folder is not followed
        masks, refused = {}, {}
        for r in ok:
            try:
                masks[stem_key(r["path"])] = run.mask_file(r["mask_path"])
            except OutsidePathError as err:  # an error row, not a read outside the run
                masks[stem_key(r["path"])], refused[stem_key(r["path"])] = None, f"prediction mask {err}"
        conventions = {r.get("convention") for r in ok} - {None}
        return Predictions(
            masks, {stem_key(r["path"]): r["path"] for r in ok},
            {stem_key(r["path"]): r["est_dice"] for r in ok if r.get("est_dice") is not None},
            {stem_key(r["path"]): (r["right_lung_rle"], r["left_lung_rle"]) for r in ok if r.get("right_lung_rle")},
            conventions.pop() if len(conventions) == 1 else meta.get("convention"), refused,
            {stem_key(r["path"]): tuple(r["pixel_spacing"]) for r in ok if r.get("pixel_spacing")},
        )
    if pred.is_dir():
        rels = find_images(pred)
        return Predictions({stem_key(rel): pred / rel for rel in rels}, {stem_key(rel): rel for rel in rels})
    raise LungkitError(f"predictions must be a manifest.parquet or a folder of masks: {pred}")


def _lung_dice(pred: np.ndarray, truth: np.ndarray, sides: tuple[dict, dict] | None,
               truth_sides: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
    """Dice of each lung: the prediction's own split where its manifest has one, the truth's own where it has one
    (CheXmask), else each split by the same rule lungkit splits masks with."""
    if sides is not None:
        try:  # RLEs that do not fit the mask file (or are out of bounds): no per-lung figure
            right, left = (rle.decode(r, expect_shape=truth.shape) for r in sides)
        except (ValueError, KeyError, TypeError):
            return {}
    else:
        labels = lung_sides(pred)
        right, left = labels == RIGHT_LUNG, labels == LEFT_LUNG
    if truth_sides is None:
        labels = lung_sides(truth)
        truth_sides = (labels == RIGHT_LUNG, labels == LEFT_LUNG)
    return {"dice_right_lung": dice(right, truth_sides[0]), "dice_left_lung": dice(left, truth_sides[1])}


def _truth_pixels(path: Path, root: Path) -> np.ndarray:
    """A truth mask's pixels; a file that is not a mask (a photograph, a radiograph: --truth at the wrong
    folder) stops the evaluation with one line naming it, rather than scoring it."""
    pixels = read_gray(path)
    problem = not_a_mask(pixels)
    if problem:
        raise LungkitError(f"--truth {root}: {path.relative_to(root).as_posix()} is {problem}; give the folder of "
                           "the ground-truth masks")
    return pixels


def _chexmask_sides(row: chexmask.Row, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(right, left) lungs of a CheXmask row at `shape` (nearest neighbour where CheXmask's size differs)."""
    sides = []
    for text in (row.right, row.left):
        lung = chexmask.decode(text, row.height, row.width)
        if lung.shape != tuple(shape):
            lung = cv2.resize(lung.astype(np.uint8), (shape[1], shape[0]), interpolation=cv2.INTER_NEAREST) > 0
        sides.append(lung)
    return sides[0], sides[1]


def _truth_name(truth, out: str | Path) -> str:
    return f"chexmask:{truth.image_id}" if isinstance(truth, chexmask.Row) else _relative(truth, out)


def _relative(path: Path, out: str | Path) -> str:
    """A path as written in outputs: relative to the output folder (no absolute path of this machine)."""
    return Path(os.path.relpath(path, out)).as_posix()


def est_dice_agreement(estimated: np.ndarray, measured: np.ndarray) -> dict | None:
    """How well est_dice tracks the measured Dice: Spearman rank correlation, mean absolute error, bias."""
    from scipy.stats import spearmanr

    if len(estimated) < 3 or np.ptp(estimated) == 0 or np.ptp(measured) == 0:
        return None  # rank correlation undefined
    return {"n": int(len(estimated)), "spearman": float(spearmanr(estimated, measured)[0]),
            "mae": float(np.abs(estimated - measured).mean()), "bias": float((estimated - measured).mean())}


def evaluate_masks(pred: str | Path, truth: str | Path | None, out: str | Path, progress: bool = True,
                   truth_convention: str | None = None, truth_chexmask: str | Path | None = None,
                   chexmask_id: str | None = None) -> dict:
    """Score every prediction that has a truth mask; writes OUT/metrics.parquet and OUT/summary.json.
    `truth`: a folder of masks; or `truth_chexmask`: a CheXmask CSV (its right and left lungs; a truth of another
    size is resized to the prediction's with nearest neighbour, and counted). `truth_convention`: what the truth
    outlines (CheXmask: jsrt); predictions known to outline another are refused (a Dice across conventions
    measures the convention gap, not the masks)."""
    from tqdm.auto import tqdm

    found = _predictions(Path(pred))
    preds, estimated, paths = found.masks, found.est_dice, found.paths
    if truth_chexmask is not None:
        truth_convention = truth_convention or "jsrt"  # CheXmask outlines the visible lung fields
    if truth_convention and found.convention and found.convention != truth_convention:
        raise LungkitError(f"the predictions are {found.convention} masks and the truth is {truth_convention}: compare like "
                           f"with like (segment again with --convention {truth_convention})")
    if truth_chexmask is not None:
        rows_cx, _, _ = chexmask.read_csv(truth_chexmask, chexmask_id)
        matched, _ = chexmask.match_images(rows_cx, sorted(paths.values()))
        truths = {stem_key(rel): row for rel, row in matched.items()}
        truth = None
    else:
        truth = Path(truth)
        truths = {stem_key(rel): truth / rel for rel in find_images(truth)}
    resized = 0
    common = sorted(set(preds) & set(truths))
    if not common:
        raise LungkitError(f"no prediction matches a truth mask by relative path ({len(preds)} predictions, {len(truths)} truths)")
    rows = []
    for key in tqdm(common, disable=not progress, unit="img"):
        if key in found.refused:
            rows.append({"path": paths[key], "truth_mask": _truth_name(truths[key], out), "status": "error",
                         "error": found.refused[key]})
            continue
        row = {"path": paths[key], "pred_mask": _relative(preds[key], out), "truth_mask": _truth_name(truths[key], out), "status": "ok",
               "est_dice": estimated.get(key)}
        try:
            p = binarize_mask(read_gray(preds[key]))
            truth_sides = None
            if isinstance(truths[key], chexmask.Row):
                truth_sides = _chexmask_sides(truths[key], p.shape)
                resized += truth_sides[0].shape != (truths[key].height, truths[key].width)
                t = truth_sides[0] | truth_sides[1]
            else:
                t = binarize_mask(_truth_pixels(truths[key], truth))
            if p.shape != t.shape:
                raise ValueError(f"prediction {p.shape[::-1]} and truth {t.shape[::-1]} differ in size")
            spacing = found.spacing.get(key)
            row.update(dice=dice(p, t), iou=iou(p, t), hd95_px=hd95(p, t), hd95_mm=hd95(p, t, spacing) if spacing else None,
                       **_lung_dice(p, t, found.sides.get(key), truth_sides))
        except (OSError, ImageDecodeError, ValueError) as err:
            row.update(status="error", error=str(err))
        rows.append(row)
    with output_errors(out):
        make_dirs(out)
        write_table(pa.Table.from_pylist(rows, schema=pa.schema(FIELDS)), Path(out) / "metrics.parquet")
    summary = {"truth_convention": truth_convention, "prediction_convention": found.convention,
               "n": len(rows), "n_error": sum(r["status"] == "error" for r in rows),
               "unmatched_predictions": len(set(preds) - set(truths)), "unmatched_truths": len(set(truths) - set(preds)),
               "truth_resized": resized}  # CheXmask truths of another size, resized (nearest) to the prediction's
    for metric in METRICS:
        values = np.array([r[metric] for r in rows if r["status"] == "ok" and r.get(metric) is not None and not math.isnan(r[metric])])
        summary[metric] = (
            {"mean": float(values.mean()), "median": float(np.median(values)), "min": float(values.min()), "max": float(values.max())}
            if values.size else None
        )
    pairs = [(r["est_dice"], r["dice"]) for r in rows if r["status"] == "ok" and r["est_dice"] is not None]
    summary["est_dice"] = est_dice_agreement(*map(np.array, zip(*pairs))) if pairs else None
    with output_errors(out):
        atomic_write_bytes(Path(out) / "summary.json", json.dumps(summary, indent=2).encode())
    return summary

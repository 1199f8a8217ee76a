"""`lungkit evaluate`: per-image Dice, IoU and HD95 of predicted masks against ground truth."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from lungmask_kit import chexmask, rle
from lungmask_kit.derive import binarize_mask, not_a_mask
from lungmask_kit.discovery import find_images, stem_key
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import OutsidePathError, atomic_write_bytes, make_dirs, output_errors
from lungmask_kit.imaging import ImageDecodeError, read_gray
from lungmask_kit.manifest import MANIFEST_NAME, open_run, write_table
from lungmask_kit.metrics import dice, hd95, iou
from lungmask_kit.postprocess import LEFT_LUNG, RIGHT_LUNG, lung_sides

METRICS = ("dice", "iou", "hd95_px", "hd95_mm", "dice_right_lung", "dice_left_lung", "heart_dice", "heart_hd95_px",
           "ctr_abs_error")
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
    # --truth-heart: the run's heart mask (heart_path) against a heart-mask folder
    pa.field("heart_dice", pa.float64()),
    pa.field("heart_hd95_px", pa.float64()),
    # --truth-ctr: the run's cardiothoracic ratio against a CSV's (null where the run reports none)
    pa.field("ctr", pa.float64()),
    pa.field("truth_ctr", pa.float64()),
    pa.field("ctr_abs_error", pa.float64()),
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
    hearts: dict[str, Path | dict | None] = field(default_factory=dict)  # heart PNG or RLE (None: a PNG out of the run)
    ctr: dict[str, float | None] = field(default_factory=dict)  # the run's cardiothoracic ratio


def _predictions(pred: Path) -> Predictions:
    """The predictions of a manifest or a folder (a folder has no est_dice, lung sides or convention)."""
    if pred.is_dir() and (pred / MANIFEST_NAME).is_file():  # a run folder: its manifest says where its masks are
        pred = pred / MANIFEST_NAME
    if pred.is_file() and pred.suffix == ".parquet":
        wanted = ("path", "status", "mask_path", "est_dice", "convention", "right_lung_rle", "left_lung_rle", "pixel_spacing",
                  "heart_path", "heart_rle", "ctr")
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
        hearts = {}
        for r in ok:
            if r.get("heart_path"):
                try:
                    hearts[stem_key(r["path"])] = run.output_file(r["heart_path"])
                except OutsidePathError:
                    hearts[stem_key(r["path"])] = None
            elif r.get("heart_rle"):
                hearts[stem_key(r["path"])] = r["heart_rle"]
        return Predictions(
            masks, {stem_key(r["path"]): r["path"] for r in ok},
            {stem_key(r["path"]): r["est_dice"] for r in ok if r.get("est_dice") is not None},
            {stem_key(r["path"]): (r["right_lung_rle"], r["left_lung_rle"]) for r in ok if r.get("right_lung_rle")},
            conventions.pop() if len(conventions) == 1 else meta.get("convention"), refused,
            {stem_key(r["path"]): tuple(r["pixel_spacing"]) for r in ok if r.get("pixel_spacing")},
            hearts, {stem_key(r["path"]): r.get("ctr") for r in ok},
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
    """(right, left) lungs of a CheXmask row at `shape` (`chexmask.fit_to_image`: un-padded or resized where
    CheXmask's size differs; ValueError where its aspect ratio fits neither layout)."""
    chexmask.check_size(row.height, row.width, shape)
    right, left = (chexmask.fit_to_image(chexmask.decode(text, row.height, row.width), shape)[0]
                   for text in (row.right, row.left))
    return right, left


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


def read_ctr_csv(path: str | Path, column: str = "ctr") -> dict[str, float]:
    """A CSV of cardiothoracic ratios -> {image key: ratio}: the image is named by its `path`, `name` or `image`
    column (the first there), the ratio by `column`; rows with an empty ratio are left out."""

    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            names = reader.fieldnames or []
            id_column = next((c for c in ("path", "name", "image") if c in names), None)
            if id_column is None or column not in names:
                raise LungkitError(f"--truth-ctr {path}: needs an image column (path, name or image) and a {column!r} "
                                   f"column (--ctr-column); it has {', '.join(names) or 'none'}")
            ratios = {}
            for r in reader:
                value = (r.get(column) or "").strip()
                if not value:
                    continue
                try:
                    ratio = float(value)
                except ValueError:
                    raise LungkitError(f"--truth-ctr {path}: {column} {value!r} of {r[id_column]!r} is not a number") from None
                if not math.isfinite(ratio) or ratio <= 0:
                    raise LungkitError(f"--truth-ctr {path}: {column} {value!r} of {r[id_column]!r} is not a positive ratio")
                ratios[stem_key(r[id_column])] = ratio
    except OSError as err:
        raise LungkitError(f"--truth-ctr {path}: cannot read it ({err.strerror or err})") from err
    except (csv.Error, UnicodeDecodeError) as err:
        raise LungkitError(f"--truth-ctr {path}: not a readable CSV ({err})") from err
    return ratios


def _score_lungs(row: dict, key: str, found: Predictions, truth_item, truth_root: Path | None) -> bool:
    """Lung metrics of one image into `row`; True when a CheXmask truth was resized to the prediction."""
    p = binarize_mask(read_gray(found.masks[key]))
    truth_sides = None
    if isinstance(truth_item, chexmask.Row):
        truth_sides = _chexmask_sides(truth_item, p.shape)
        t = truth_sides[0] | truth_sides[1]
    else:
        t = binarize_mask(_truth_pixels(truth_item, truth_root))
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape[::-1]} and truth {t.shape[::-1]} differ in size")
    spacing = found.spacing.get(key)
    row.update(dice=dice(p, t), iou=iou(p, t), hd95_px=hd95(p, t), hd95_mm=hd95(p, t, spacing) if spacing else None,
               **_lung_dice(p, t, found.sides.get(key), truth_sides))
    return truth_sides is not None and truth_sides[0].shape != (truth_item.height, truth_item.width)


def _score_heart(row: dict, predicted: Path | dict | None, truth_path: Path, truth_root: Path) -> None:
    if predicted is None:
        raise ValueError("the run has no heart mask for this image inside its folder")
    t = binarize_mask(_truth_pixels(truth_path, truth_root))
    p = rle.decode(predicted) if isinstance(predicted, dict) else binarize_mask(read_gray(predicted))
    if p.shape != t.shape:
        raise ValueError(f"heart prediction {p.shape[::-1]} and truth {t.shape[::-1]} differ in size")
    row.update(heart_dice=dice(p, t), heart_hd95_px=hd95(p, t))


def evaluate_masks(pred: str | Path, truth: str | Path | None, out: str | Path, progress: bool = True,
                   truth_convention: str | None = None, truth_chexmask: str | Path | None = None,
                   chexmask_id: str | None = None, truth_heart: str | Path | None = None,
                   truth_ctr: str | Path | None = None, ctr_column: str = "ctr") -> dict:
    """Score every prediction that has a truth; writes OUT/metrics.parquet and OUT/summary.json.

    Args:
        truth: a folder of lung masks; or `truth_chexmask`: a CheXmask CSV (its right and left lungs; a truth of
            another size is un-padded or resized to the prediction's (`chexmask.fit_to_image`) and counted).
        truth_convention: what the lung truth outlines (CheXmask: jsrt); predictions known to outline another are
            refused (a Dice across conventions measures the convention gap, not the masks).
        truth_heart: a folder of heart masks, scored against the run's heart masks (`heart_path`).
        truth_ctr: a CSV of cardiothoracic ratios (`read_ctr_csv`), against the run's `ctr`; images the run
            reports no ratio for are counted (`ctr_null`), not scored.
    At least one truth is needed; an image is scored on every truth it has."""

    found = _predictions(Path(pred))
    preds, estimated, paths = found.masks, found.est_dice, found.paths
    if truth_chexmask is not None:
        truth_convention = truth_convention or "jsrt"  # CheXmask outlines the visible lung fields
    if truth_convention and found.convention and found.convention != truth_convention:
        raise LungkitError(f"the predictions are {found.convention} masks and the truth is {truth_convention}: compare like "
                           f"with like (segment again with --convention {truth_convention})")
    truths: dict = {}
    chexmask_ambiguous: list[str] = []
    if truth_chexmask is not None:
        ids = chexmask.read_csv(truth_chexmask, chexmask_id, with_masks=False)
        matches = chexmask.match_images(ids.rows, sorted(paths.values()))
        wanted = {row.image_id for row in matches.matched.values()}
        full = {r.image_id: r for r in chexmask.read_csv(truth_chexmask, ids.id_column, only_ids=wanted).rows}
        matches.matched = {rel: full[row.image_id] for rel, row in matches.matched.items()}
        truths = {stem_key(rel): row for rel, row in matches.matched.items()}
        chexmask_ambiguous = matches.ambiguous
        truth = None
    elif truth is not None:
        truth = Path(truth)
        truths = {stem_key(rel): truth / rel for rel in find_images(truth)}
    hearts: dict = {}
    if truth_heart is not None:
        if not found.hearts:
            raise LungkitError(f"{pred} has no heart masks: segment with a model that draws the heart (the bundled one does)")
        truth_heart = Path(truth_heart)
        hearts = {stem_key(rel): truth_heart / rel for rel in find_images(truth_heart)}
    ratios = read_ctr_csv(truth_ctr, ctr_column) if truth_ctr is not None else {}
    if ratios and not any(v is not None for v in found.ctr.values()) and not found.hearts:
        raise LungkitError(f"{pred} has no cardiothoracic ratios: segment with a model that draws the heart")
    resized = 0
    common = sorted(set(preds) & (set(truths) | set(hearts) | set(ratios)))
    if not common:
        raise LungkitError(f"no prediction matches a truth by relative path ({len(preds)} predictions, "
                           f"{len(truths) + len(hearts) + len(ratios)} truths)")
    rows = []
    for key in tqdm(common, disable=not progress, unit="img"):
        if key in found.refused:
            rows.append({"path": paths[key], "truth_mask": _truth_name(truths[key], out) if key in truths else None,
                         "status": "error", "error": found.refused[key]})
            continue
        row = {"path": paths[key], "pred_mask": _relative(preds[key], out), "status": "ok", "est_dice": estimated.get(key)}
        try:
            if key in truths:
                row["truth_mask"] = _truth_name(truths[key], out)
                resized += _score_lungs(row, key, found, truths[key], truth)
            if key in hearts:
                _score_heart(row, found.hearts.get(key), hearts[key], truth_heart)
            if key in ratios:
                ctr = found.ctr.get(key)
                row.update(ctr=ctr, truth_ctr=ratios[key], ctr_abs_error=None if ctr is None else abs(ctr - ratios[key]))
        except (OSError, ImageDecodeError, ValueError) as err:
            row.update(status="error", error=str(err))
        rows.append(row)
    with output_errors(out):
        make_dirs(out)
        write_table(pa.Table.from_pylist(rows, schema=pa.schema(FIELDS)), Path(out) / "metrics.parquet")
    summary = {"truth_convention": truth_convention, "prediction_convention": found.convention,
               "n": len(rows), "n_error": sum(r["status"] == "error" for r in rows),
               "unmatched_predictions": len(set(preds) - set(truths) - set(hearts) - set(ratios)),
               "unmatched_truths": len((set(truths) | set(hearts) | set(ratios)) - set(preds)),
               "truth_resized": resized,  # CheXmask truths of another size, resized (nearest) to the prediction's
               "chexmask_ambiguous": len(chexmask_ambiguous)}  # CheXmask ids that fit several images: not scored
    for metric in METRICS:
        values = np.array([r[metric] for r in rows if r["status"] == "ok" and r.get(metric) is not None and not math.isnan(r[metric])])
        summary[metric] = (
            {"n": int(values.size), "mean": float(values.mean()), "median": float(np.median(values)),
             "min": float(values.min()), "max": float(values.max())}
            if values.size else None
        )
    if ratios:  # truths the run gave no ratio for (no heart, a lung missing, flagged not frontal): not scored
        summary["ctr_null"] = sum(r["status"] == "ok" and r.get("truth_ctr") is not None and r.get("ctr") is None for r in rows)
    pairs = [(r["est_dice"], r["dice"]) for r in rows if r["status"] == "ok" and r["est_dice"] is not None and r.get("dice") is not None]
    summary["est_dice"] = est_dice_agreement(*map(np.array, zip(*pairs))) if pairs else None
    with output_errors(out):
        atomic_write_bytes(Path(out) / "summary.json", json.dumps(summary, indent=2).encode())
    return summary

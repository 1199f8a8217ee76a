"""One image-mask pair of a variants run: read both, check they belong together, finish the lungs
(`anatomy.lungs`), derive and write the variants; a manifest row, never an exception for bad input. Runs in joblib
workers."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from lungmask_kit import chexmask, defaults, rle
from lungmask_kit.anatomy.heart import heart_fields, thorax_fields
from lungmask_kit.anatomy.lungs import lung_columns, lungs_from_mask
from lungmask_kit.decoder_warnings import WarningTally
from lungmask_kit.derive import binarize_mask, bounding_box, derive_variants
from lungmask_kit.discovery import output_path_problem, wants_dicom
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import InputReadError, atomic_write_bytes, confined, digest, inside
from lungmask_kit.imaging import ImageDecodeError, decode_image, encode_png, read_checked
from lungmask_kit.manifest import VariantsRow
from lungmask_kit.models.modeling import load_config
from lungmask_kit.quality import ShapeModel, convention_config
from lungmask_kit.variants.options import VariantsOptions
from lungmask_kit.variants.sources import PairTask


@dataclass(frozen=True)
class ShapeGate:
    """The shape part of the input gate for masks made elsewhere, scored at the model's input size."""

    model: object  # quality.ShapeModel
    size: int
    digest: str  # identifies the statistics, so resume redoes rows scored with others

    def score(self, mask: np.ndarray) -> float:
        small = cv2.resize(mask.astype(np.float32), (self.size, self.size), interpolation=cv2.INTER_AREA) >= 0.5
        return round(self.model.score(small), 4)


def shape_gate(weights, convention: str = defaults.CONVENTION) -> ShapeGate | None:

    config, _ = load_config(weights)
    if not config.quality:
        return None
    try:
        shape = convention_config(config.quality, convention)["shape"]
    except ValueError as err:
        raise LungkitError(f"the shape gate of {config.name}: {err}") from err
    return ShapeGate(ShapeModel.from_dict(shape), config.input_size, digest([shape, config.input_size]))


def process(task: PairTask, out: str, options: VariantsOptions, key: str, done: tuple | None,
             gate: ShapeGate | None = None) -> tuple[dict, tuple[int, str | None]]:
    """One image-mask pair -> (a manifest row, (warnings counted, the first)); runs in a joblib worker and
    never raises for bad input. The warnings decoding raised are counted, not printed."""
    with WarningTally() as tally:
        try:
            row = _process_pair(task, out, options, key, done, gate)
        except LungkitError:
            raise  # the output folder is unusable: stop the run
        except Exception as err:  # an unforeseen failure costs one image, never the batch
            row = VariantsRow(path=task.rel, status="error", settings_key=key, mask_path=task.mask_rel, **task.extra,
                              error=f"unexpected error: {type(err).__name__}: {err}")
    return row, (tally.count, tally.first)


def _mask_data(task: PairTask) -> tuple[str, object]:
    """(sha256 identifying the mask, its undecoded form): a file's bytes, or a published RLE."""
    if task.mask_rle is not None:
        return hashlib.sha256(json.dumps(task.mask_rle, sort_keys=True).encode()).hexdigest(), task.mask_rle
    if task.chexmask is not None:
        c = task.chexmask
        return hashlib.sha256(json.dumps([c.right, c.left, c.height, c.width, c.heart]).encode()).hexdigest(), c
    if task.mask is None:
        raise LookupError("no mask for this image")
    data = read_checked(task.mask)
    return hashlib.sha256(data).hexdigest(), data


def _decode_mask(task: PairTask, data, image_shape: tuple[int, int], exact: bool = True) -> np.ndarray:
    """The mask's pixels; a published RLE's size is checked (against the image when `exact`, i.e. unless masks
    may be resized), a CheXmask entry's against its image's layouts, before anything is allocated."""
    if task.mask_rle is not None:
        return rle.decode(data, expect_shape=image_shape if exact else None).astype(np.uint8) * 255
    if task.chexmask is not None:  # the two lungs' union (sizes checked before allocating)
        chexmask.check_size(data.height, data.width, image_shape)
        return (chexmask.decode(data.right, data.height, data.width)
                | chexmask.decode(data.left, data.height, data.width)).astype(np.uint8) * 255
    return decode_image(data, dicom=wants_dicom(task.mask_rel or "")).pixels


def _chexmask_heart(entry: chexmask.Row, lungs: np.ndarray, sides: np.ndarray, pixel_spacing) -> dict:
    """The heart fields of a CheXmask entry at the image's size (brought there as its lungs were),
    and the thorax width of its (visible-lung) lungs for the CTR; a reason where CheXmask has no heart."""
    if not entry.heart:
        return {"ctr_null_reason": "CheXmask gives no heart for this image"}
    chexmask.check_size(entry.height, entry.width, lungs.shape)
    heart, _ = chexmask.fit_to_image(chexmask.decode(entry.heart, entry.height, entry.width), lungs.shape)
    fields = {**heart_fields(heart, pixel_spacing), **thorax_fields(lungs, sides, heart)}
    if fields["heart_width_px"] is None:
        fields["ctr_null_reason"] = "no heart found"
    return fields


def _process_pair(task: PairTask, out: str, options: VariantsOptions, key: str, done: tuple | None,
                  gate: ShapeGate | None) -> dict:
    row = VariantsRow(path=task.rel, status="error", settings_key=key, mask_path=task.mask_rel, **task.extra)
    out_dir = Path(out)
    # paths from a manifest stay inside the folders it names: nothing is read or written outside them
    if not confined(task.rel) or (task.mask_rel is not None and (not confined(task.mask_rel) or task.mask is None)):
        row["error"] = "path leaves the input folder (absolute or with ..): not read"
        return row
    if not confined(task.out_rel):  # lungkit makes the names; this guards the one rule for writes
        row["error"] = "output name leaves the output folder: not written"
        return row
    problem = output_path_problem(out, f"lungs/{task.out_rel}")
    if problem:
        row["error"] = problem
        return row
    try:
        data = read_checked(task.image)
    except InputReadError as err:
        row["error"] = f"image: {err}"
        return row
    row.update(sha256=hashlib.sha256(data).hexdigest(), file_bytes=len(data))
    if task.expected_sha256 and row["sha256"] != task.expected_sha256:
        row["error"] = "image differs from the one the mask was published for (sha256 mismatch): not the same file"
        return row
    try:
        mask_sha, mask_data = _mask_data(task)
    except LookupError as err:
        row["error"] = str(err)
        return row
    except InputReadError as err:
        row["error"] = f"mask: {err}"
        return row
    row["mask_sha256"] = mask_sha
    paths = {v: f"{v}/{task.out_rel}" for v in options.only}
    if done == (row["sha256"], mask_sha) and all((out_dir / p).is_file() for p in paths.values()):
        return row | {"status": "skipped"}
    try:
        image = decode_image(data, dicom=task.dicom)
    except ImageDecodeError as err:
        row.update({k: v for k, v in err.header.items() if v is not None}, error=f"image: {err}")
        return row
    row.update({k: v for k, v in image.header.items() if v is not None})
    try:
        mask_pixels = _decode_mask(task, mask_data, image.pixels.shape, exact=not options.resize_masks)
    except (ImageDecodeError, ValueError) as err:
        row["error"] = f"mask: {err}"
        return row
    pixels = image.pixels
    h, w = pixels.shape
    row.update(width=w, height=h, bit_depth=image.bit_depth, source_channels=image.source_channels)
    if task.chexmask is not None:
        row.update(mask_source="chexmask", mask_quality=task.chexmask.rca_mean)
    if task.chexmask is not None and mask_pixels.shape != pixels.shape:
        # CheXmask's masks of some corpora are at another size, or of the image padded to a square: said in the row
        try:
            fitted, row["mask_source"] = chexmask.fit_to_image(mask_pixels > 0, pixels.shape)
        except ValueError as err:
            row["error"] = f"mask: {err}"
            return row
        mask_pixels = fitted.astype(np.uint8) * 255
    if mask_pixels.shape != pixels.shape:
        if not options.resize_masks:
            row["error"] = (f"mask size {mask_pixels.shape[1]}x{mask_pixels.shape[0]} differs from image size {w}x{h} "
                            "(use --resize-masks to resize with nearest neighbour)")
            return row
        mask_pixels = cv2.resize(mask_pixels, (w, h), interpolation=cv2.INTER_NEAREST)
    mask = binarize_mask(mask_pixels)

    lungs = lungs_from_mask(mask)
    row.update(lung_columns(lungs, row.get("pixel_spacing")))
    if task.chexmask is not None:
        try:
            row.update(_chexmask_heart(task.chexmask, mask, lungs.sides(), row.get("pixel_spacing")))
        except ValueError as err:  # a damaged Heart costs the heart fields, not the lungs
            row["ctr_null_reason"] = f"CheXmask's heart is unreadable: {err}"
    box = bounding_box(mask, options.margin) if options.crop else None
    derived = derive_variants(pixels, mask, options.only)
    for variant, arr in derived.items():
        if box is not None:
            arr = arr[box[0] : box[1], box[2] : box[3]]
        target = out_dir / paths[variant]
        if not inside(target.parent, out_dir):  # a folder swapped for a symlink out of OUT
            row["error"] = f"the folder of {paths[variant]} resolves outside the output folder: not written"
            return row
        try:
            atomic_write_bytes(target, encode_png(arr), fsync=False)
        except OSError as err:
            raise LungkitError(f"cannot write outputs to {out}: {err.strerror or err}") from err
    row.update(
        lungs_path=paths.get("lungs"), nolungs_path=paths.get("nolungs"), crop_box=list(box) if box else None,
        status="ok", error=None, ood_shape_score=gate.score(mask) if gate is not None else None,
    )
    return row

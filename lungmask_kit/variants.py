"""`lungkit variants`: lungs-only / lungs-removed images from existing masks, without a model.

Image-mask pairs come from a segment manifest or from two folders matched by relative path. Work is
spread over processes with joblib; each finished chunk becomes a manifest part, so runs resume like
`segment`. The derive step is `lungmask_kit.derive.derive_variants`, the same one `segment` uses.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from lungmask_kit import __version__, chexmask, defaults, rle
from lungmask_kit.anatomy.heart import heart_fields, thorax_fields
from lungmask_kit.anatomy.lungs import lung_columns, lungs_from_mask
from lungmask_kit.decoder_warnings import WarningTally
from lungmask_kit.derive import VARIANTS, binarize_mask, bounding_box, derive_variants
from lungmask_kit.discovery import find_images, output_names, output_path_problem, stem_key, wants_dicom
from lungmask_kit.errors import LungkitError, NoImagesError
from lungmask_kit.fileio import (
    InputReadError,
    OutsidePathError,
    atomic_write_bytes,
    confined,
    digest,
    inside,
    utc_stamp,
)
from lungmask_kit.imaging import ImageDecodeError, decode_image, encode_png, read_checked
from lungmask_kit.manifest import (
    MANIFEST_NAME,
    SEGMENT_FIELDS,
    VARIANTS_EXTRA_FIELDS,
    VariantsRow,
    carry_columns,
    folder_entries,
    open_run,
    read_metadata,
)
from lungmask_kit.qc import QCThresholds, qc_update
from lungmask_kit.quality import ShapeModel, convention_config
from lungmask_kit.runfolder import RunFolder, RunKind, RunSummary, keep_existing
from lungmask_kit.runtime import available_cores

FIELDS = SEGMENT_FIELDS + VARIANTS_EXTRA_FIELDS
OUTPUT_FORMAT = 3  # 2: ood_shape_score; 3: right and left lung columns
_CHUNK = 64  # rows per manifest part


@dataclass
class VariantsOptions:
    crop: bool = False
    margin: int = 0
    min_lung_fraction: float = defaults.MIN_LUNG_FRACTION
    only: tuple[str, ...] = VARIANTS
    resize_masks: bool = False
    jobs: int = 0  # 0: every core
    glob: str | None = None
    overwrite: bool = False
    in_place: bool = False
    progress: bool = True
    weights: str | Path | None = None  # whose mask-shape statistics score the masks (default: the bundled model)
    max_ood_score: float | None = None  # None: that model's gate (1.0)
    input_root: str | Path | None = None  # where a manifest's images are now (default: where it recorded them)
    dicom: bool = False  # folder mode: also read extensionless / UID-named files as DICOM
    convention: str | None = None  # folder mode: what the masks outline (recorded; None: not known)
    chexmask: str | Path | None = None  # a CheXmask CSV: the masks of the images under `images`
    chexmask_id: str | None = None  # its image id column (None: found among chexmask.ID_COLUMNS)
    min_rca: float | None = None  # drop CheXmask rows whose Dice RCA (Mean) is under this


@dataclass(frozen=True)
class _Task:
    rel: str  # image path relative to images_root (manifest key)
    image: str  # absolute image path
    mask: str | None  # absolute mask path, None when no mask matched
    mask_rel: str | None
    out_rel: str  # output relative path (.png)
    extra: dict  # label, patient_id, split and header columns carried over from a manifest
    dicom: bool = False  # read as DICOM even without the preamble (named .dcm, or found by segment/variants --dicom)
    mask_rle: dict | None = None  # the mask itself, from a published masks-only dataset (no mask file)
    expected_sha256: str | None = None  # the image the published mask was made for
    chexmask: chexmask.Row | None = None  # the mask from a CheXmask CSV (right and left lung run-length strings)


def _settings_key(options: VariantsOptions, gate: _ShapeGate | None) -> str:
    payload = {"crop": options.crop, "margin": options.margin if options.crop else 0, "only": sorted(options.only),
               "resize_masks": options.resize_masks, "format": OUTPUT_FORMAT, "shape_gate": gate and gate.digest}
    return digest(payload)


def pairs_from_folders(images: Path, masks: Path, glob: str | None = None, dicom: bool = False) -> list[tuple[str, str | None]]:
    """(image rel, mask rel or None) matched by relative path without extension, then by unique file stem."""
    mask_rels = find_images(masks, dicom=dicom)
    by_key = {stem_key(m): m for m in mask_rels}
    by_stem: dict[str, list[str]] = {}
    for m in mask_rels:
        by_stem.setdefault(PurePosixPath(m).stem, []).append(m)
    pairs = []
    for rel in find_images(images, glob, dicom):
        m = by_key.get(stem_key(rel))
        if m is None:
            cands = by_stem.get(PurePosixPath(rel).stem, [])
            m = cands[0] if len(cands) == 1 else None
        pairs.append((rel, m))
    return pairs


# columns a variants row takes over from the segment manifest's row (its own measures are recomputed)
# what a segment run measured on its masks that variants cannot (it has no model): carried from its manifest
SEGMENT_TRUST = ("ood_score", "ood_image_score", "view_guess", "ood_shape_score", "est_dice", "heart_rle", "heart_fraction",
                 "heart_mm2", "heart_width_px", "thorax_width_px", "ctr", "ctr_null_reason")
_CARRIED = ("label", "patient_id", "split", "view", "modality", "study_uid", "series_uid", "sop_uid", "pixel_spacing",
            "convention")


def _tasks_from_manifest(manifest: Path, glob: str | None, input_root: Path | None = None
                         ) -> tuple[list[_Task], Path, Path, pa.Table | None]:
    """The image-mask pairs a manifest names, and its columns beyond lungkit's own (a label file's source,
    licence, finding, ...) keyed by path, to be carried into the variants manifest. A mask path that leads out
    of the run is left as written: `_process_pair` makes it an error row."""
    run = open_run(manifest, input_root)
    if not run.input_root.is_dir():
        raise LungkitError(f"the images of {run.path} are not at {run.input_root}: give their folder with --input-root")
    source = run.table
    rows = source.select([c for c in source.column_names if c in {f.name for f in FIELDS}]).to_pylist()
    rows = [r for r in rows if not glob or fnmatch.fnmatch(r["path"], glob)]
    names = output_names([r["path"] for r in rows])
    tasks = []
    for r in rows:
        mask_rel = r.get("mask_path") if r["status"] == "ok" else None
        try:
            mask = str(run.mask_file(mask_rel)) if mask_rel else None
        except OutsidePathError:
            mask = None
        tasks.append(_Task(r["path"], str(run.input_root / r["path"]), mask, mask_rel, names[r["path"]],
                           {k: r.get(k) for k in _CARRIED}, wants_dicom(r["path"], dicom=True)))
    own = {f.name for f in FIELDS}
    others = [c for c in source.column_names if c not in own]
    if run.meta.get("command") == "segment":  # the same masks: the model's verdicts on them stand
        others += [c for c in SEGMENT_TRUST if c in source.column_names]
    carried = source.select(["path", *others]) if others else None
    return tasks, run.input_root, run.masks_root, carried


def _tasks_from_chexmask(options: VariantsOptions, images: Path) -> tuple[list[_Task], int, chexmask.Matches]:
    """(tasks, CheXmask rows dropped by --min-rca, how the rows met the images) of a CheXmask CSV and its images.
    Only images that have a row are processed; CheXmask outlines the visible lungs (the jsrt convention)."""
    # two passes: ids first, then the run-length strings of the matched rows only (a CheXmask CSV is GBs)
    ids = chexmask.read_csv(options.chexmask, options.chexmask_id, options.min_rca, with_masks=False)
    rels = find_images(images, options.glob, options.dicom)
    matches = chexmask.match_images(ids.rows, rels)
    wanted = {row.image_id for row in matches.matched.values()}
    full = {row.image_id: row for row in chexmask.read_csv(options.chexmask, ids.id_column, options.min_rca,
                                                           only_ids=wanted).rows}
    names = output_names(sorted(matches.matched))
    tasks = [_Task(rel, str(images / rel), None, None, names[rel], {"convention": "jsrt"}, wants_dicom(rel, options.dicom),
                   chexmask=full[row.image_id]) for rel, row in sorted(matches.matched.items())]
    matches.unreadable = ids.unreadable
    return tasks, ids.dropped, matches


def _tasks_from_dataset(dataset: Path, glob: str | None, input_root: Path | None
                        ) -> tuple[list[_Task], Path, Path, pa.Table | None]:
    """The rows of a dataset made by `lungkit publish --masks-only`: each mask from its RLE, each image from
    --input-root, checked against the sha256 it was published with. A dataset is untrusted input: its paths
    only name images under --input-root, and output names are lungkit's own, never the dataset's."""

    files = sorted((dataset / "data").glob("*.parquet"))
    if not files:
        raise LungkitError(f"{dataset} is neither a manifest nor a dataset made by lungkit publish (no data/*.parquet)")
    try:
        table = pa.concat_tables([pq.read_table(f) for f in files], promote_options="default")
    except (OSError, ValueError, pa.ArrowException) as err:
        raise LungkitError(f"{dataset}: unreadable Parquet file ({type(err).__name__})") from err
    if "mask_rle" not in table.column_names or "path" not in table.column_names:
        raise LungkitError(f"{dataset} has no mask_rle column: a full dataset already holds its lungs and nolungs "
                           "(variants rebuilds them from a --masks-only one)")
    if input_root is None or not Path(input_root).is_dir():
        raise LungkitError("a masks-only dataset holds no images: give the folder of its source images with --input-root")
    own = {f.name for f in FIELDS}
    rows = [r for r in table.select([c for c in table.column_names if c in own or c == "mask_rle"]).to_pylist()
            if not glob or fnmatch.fnmatch(r["path"], glob)]
    names = output_names([r["path"] for r in rows])
    images_root, tasks = Path(input_root), []
    for r in rows:
        tasks.append(_Task(r["path"], str(images_root / r["path"]), None, None, names[r["path"]], {k: r.get(k) for k in _CARRIED},
                           wants_dicom(r["path"], dicom=True), mask_rle=r["mask_rle"], expected_sha256=r.get("sha256")))
    others = [c for c in table.column_names if c not in own and c != "mask_rle"]
    return tasks, images_root, dataset, (table.select(["path", *others]) if others else None)


@dataclass(frozen=True)
class _ShapeGate:
    """The shape part of the input gate for masks made elsewhere, scored at the model's input size."""

    model: object  # quality.ShapeModel
    size: int
    digest: str  # identifies the statistics, so resume redoes rows scored with others

    def score(self, mask: np.ndarray) -> float:
        small = cv2.resize(mask.astype(np.float32), (self.size, self.size), interpolation=cv2.INTER_AREA) >= 0.5
        return round(self.model.score(small), 4)


def _shape_gate(weights, convention: str = defaults.CONVENTION) -> _ShapeGate | None:
    from lungmask_kit.models.modeling import load_config

    config, _ = load_config(weights)
    if not config.quality:
        return None
    try:
        shape = convention_config(config.quality, convention)["shape"]
    except ValueError as err:
        raise LungkitError(f"the shape gate of {config.name}: {err}") from err
    return _ShapeGate(ShapeModel.from_dict(shape), config.input_size, digest([shape, config.input_size]))


def _process(task: _Task, out: str, options: VariantsOptions, key: str, done: tuple | None,
             gate: _ShapeGate | None = None) -> tuple[dict, tuple[int, str | None]]:
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


def _mask_data(task: _Task) -> tuple[str, object]:
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


def _decode_mask(task: _Task, data, image_shape: tuple[int, int], exact: bool = True) -> np.ndarray:
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


def _process_pair(task: _Task, out: str, options: VariantsOptions, key: str, done: tuple | None,
                  gate: _ShapeGate | None) -> dict:
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


def _process_all(folder: RunFolder, options: VariantsOptions, tasks: list[_Task], key: str, done: dict,
                 gate, summary: RunSummary, tally) -> None:
    """Every pair through `_process` in joblib workers; each chunk of rows becomes a manifest part."""
    from joblib import Parallel, delayed

    out, jobs, buffer = str(folder.out), options.jobs or available_cores(), []
    results = Parallel(n_jobs=jobs, return_as="generator", batch_size=4)(
        delayed(_process)(t, out, options, key, done.get(t.rel), gate) for t in tasks
    ) if jobs > 1 else (_process(t, out, options, key, done.get(t.rel), gate) for t in tasks)
    for row, (n_warnings, first_warning) in tqdm(results, total=len(tasks), disable=not options.progress, unit="img"):
        if n_warnings:
            tally.add(first_warning, n_warnings)
        if row["status"] == "skipped":
            summary.skipped += 1
            continue
        summary.processed += 1
        if row["status"] == "error":
            summary.errors.append((row["path"], row["error"]))
        buffer.append(row)
        if len(buffer) >= _CHUNK:
            folder.parts.write(buffer)
            buffer.clear()
    folder.parts.write(buffer)


def run_variants(
    out: str | Path,
    options: VariantsOptions,
    manifest: str | Path | None = None,
    images: str | Path | None = None,
    masks: str | Path | None = None,
) -> RunSummary:
    """`lungkit variants`: lungs-only and lungs-removed images from existing masks, without a model.

    Args:
        out: the output folder (a run folder: locked, resumable, with its manifest).
        options: what to derive and how (crop, --only, QC threshold, the shape gate's model).
        manifest: a segment or variants run (its manifest.parquet), or a dataset made by `lungkit publish
            --masks-only` (a folder; its images come from `options.input_root`).
        images, masks: two folders matched by relative path, instead of a manifest.

    Returns:
        The run's summary (counts, errors, warnings, the manifest's path).
    """
    t0 = time.perf_counter()
    out = Path(out)
    bad = set(options.only) - set(VARIANTS)
    if bad or not options.only:
        raise LungkitError(f"--only takes {', '.join(VARIANTS)} (got {', '.join(options.only) or 'nothing'})")
    chexmask_note = None
    if options.chexmask is not None:
        if options.convention not in (None, "jsrt"):
            raise LungkitError(f"--convention {options.convention} contradicts --chexmask: CheXmask's masks outline the "
                               "visible lung fields (jsrt)")
        if images is None or not Path(images).is_dir():
            raise LungkitError("--chexmask needs the folder of the images it describes: give --images")
        images_root = Path(images)
        tasks, dropped, matches = _tasks_from_chexmask(options, images_root)
        masks_root, carried, manifest = Path(options.chexmask).parent, None, None
        chexmask_note = matches.note() + (f", {dropped} below --min-rca {options.min_rca:g}"
                                          if options.min_rca is not None else "")
    elif manifest is not None and Path(manifest).is_dir():  # a dataset made by lungkit publish --masks-only
        tasks, images_root, masks_root, carried = _tasks_from_dataset(Path(manifest), options.glob, options.input_root)
        manifest = None
    elif manifest is not None:
        manifest = Path(manifest)
        if not manifest.is_file():
            raise LungkitError(f"manifest not found: {manifest}")
        if (out / MANIFEST_NAME).resolve() == manifest.resolve() and not options.in_place:
            raise LungkitError(f"{out} holds the input manifest; choose another --out or pass --in-place to replace it")
        tasks, images_root, masks_root, carried = _tasks_from_manifest(manifest, options.glob, options.input_root)
    else:
        if images is None or masks is None:
            raise LungkitError("give a manifest, or both --images and --masks")
        images_root, masks_root = Path(images), Path(masks)
        for p, what in ((images_root, "images"), (masks_root, "masks")):
            if not p.is_dir():
                raise LungkitError(f"{what} folder not found: {p}")
        carried = None
        pairs = pairs_from_folders(images_root, masks_root, options.glob, options.dicom)
        names = output_names([r for r, _ in pairs])
        extra = {"convention": options.convention} if options.convention else {}
        tasks = [_Task(r, str(images_root / r), str(masks_root / m) if m else None, m, names[r], extra,
                       wants_dicom(r, options.dicom)) for r, m in pairs]
    if not tasks:
        raise NoImagesError("no images to process")
    kind = RunKind("variants", os.path.realpath(images_root))
    # --in-place asked to replace the input manifest, which is another command's run by design
    with RunFolder(out, kind, FIELDS, options.overwrite or options.in_place, manifest_name=MANIFEST_NAME) as folder:
        summary = _run_locked(folder, options, tasks, images_root, masks_root, manifest, t0, carried)
    if chexmask_note:
        summary.warnings.insert(0, chexmask_note)
    return summary


def _convention_of(tasks: list[_Task]) -> str:
    """The convention the masks' shape is scored in: theirs where every row says the same, else the default."""
    said = {t.extra.get("convention") for t in tasks} - {None}
    return said.pop() if len(said) == 1 else defaults.CONVENTION


def _thresholds(options: VariantsOptions, gate, manifest: Path | None) -> QCThresholds:
    """QC of a variants run: the user's thresholds; else, from a segment run's manifest, that run's (its masks keep
    the flags its model gave them: input gate, est_dice, CTR); else the shape gate of --weights."""
    source = (read_metadata(manifest).get("qc") or {}) if manifest is not None else {}
    if source and read_metadata(manifest).get("command") != "segment":
        source = {}
    max_ood = options.max_ood_score if options.max_ood_score is not None else source.get("max_ood_score", gate and 1.0)
    return QCThresholds(options.min_lung_fraction, max_ood, source.get("min_est_dice"), source.get("flag_ctr_above"))


def _run_locked(folder: RunFolder, options: VariantsOptions, tasks: list[_Task], images_root: Path, masks_root: Path,
                manifest: Path | None, t0: float, carried=None) -> RunSummary:
    out = folder.out
    summary = RunSummary(found=len(tasks))
    tally = WarningTally()
    gate = _shape_gate(options.weights, _convention_of(tasks))
    folder.start()
    key = _settings_key(options, gate)
    done = folder.done(key, ("sha256", "mask_sha256"))
    thresholds = _thresholds(options, gate, manifest)
    _process_all(folder, options, tasks, key, done, gate, summary, tally)
    metadata = {
        "command": "variants", "lungkit_version": __version__, **folder_entries("input_root", images_root, out),
        **folder_entries("masks_root", masks_root, out),
        "source_manifest": Path(os.path.relpath(manifest, out)).as_posix() if manifest else None,
        "crop": options.crop, "margin": options.margin, "only": list(options.only), "resize_masks": options.resize_masks,
        "min_lung_fraction": options.min_lung_fraction, "qc": thresholds.as_dict(), "settings_key": key,
        "finished_at": utc_stamp(),
    }

    def update(table):
        return qc_update(thresholds)(carry_columns(table, carried) if carried is not None else table)

    table, summary.removed_stale = folder.finalize([t.rel for t in tasks], metadata, update=update, keep_other=keep_existing(images_root, options.overwrite))
    summary.warnings[:0] = folder.warnings
    if tally.summary():
        summary.warnings.append(tally.summary())
    summary.count(table)
    summary.manifest = str(out / MANIFEST_NAME)
    summary.output_folders = [str(out / v) for v in options.only]
    summary.seconds = summary.pipeline_seconds = time.perf_counter() - t0
    return summary

"""Where a variants run's image-mask pairs come from, one function per source: a segment or variants manifest, a
masks-only dataset made by `lungkit publish`, a CheXmask CSV beside its images, or two folders matched by relative
path. `find_pairs` picks the source the arguments name."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa
import pyarrow.parquet as pq

from lungmask_kit import chexmask
from lungmask_kit.discovery import find_images, output_names, stem_key, wants_dicom
from lungmask_kit.errors import LungkitError, NoImagesError
from lungmask_kit.fileio import OutsidePathError
from lungmask_kit.manifest import MANIFEST_NAME, open_run
from lungmask_kit.variants.options import FIELDS, VariantsOptions


@dataclass(frozen=True)
class PairTask:
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



@dataclass
class Pairs:
    """What a source gives a run: its pairs, the folders they are read from, the source's own columns to carry
    into the manifest, the manifest it came from (a run's QC thresholds carry over) and a line for the summary."""

    tasks: list[PairTask]
    images_root: Path
    masks_root: Path
    carried: pa.Table | None = None
    manifest: Path | None = None
    note: str | None = None


def find_pairs(out: Path, options: VariantsOptions, manifest: str | Path | None, images: str | Path | None,
               masks: str | Path | None) -> Pairs:
    """The pairs of the source the arguments name (see `run_variants`); a source that cannot be read is one line."""
    if options.chexmask is not None:
        found = from_chexmask(options, images)
    elif manifest is not None and Path(manifest).is_dir():  # a dataset made by lungkit publish --masks-only
        found = from_dataset(Path(manifest), options.glob, options.input_root)
    elif manifest is not None:
        found = from_manifest(Path(manifest), options.glob, options.input_root, out, options.in_place)
    else:
        found = from_folders(images, masks, options)
    if not found.tasks:
        raise NoImagesError("no images to process")
    return found


def from_folders(images: str | Path | None, masks: str | Path | None, options: VariantsOptions) -> Pairs:
    """Two folders matched by relative path (`pairs_from_folders`)."""
    if images is None or masks is None:
        raise LungkitError("give a manifest, or both --images and --masks")
    images_root, masks_root = Path(images), Path(masks)
    for p, what in ((images_root, "images"), (masks_root, "masks")):
        if not p.is_dir():
            raise LungkitError(f"{what} folder not found: {p}")
    pairs = pairs_from_folders(images_root, masks_root, options.glob, options.dicom)
    names = output_names([r for r, _ in pairs])
    extra = {"convention": options.convention} if options.convention else {}
    tasks = [PairTask(r, str(images_root / r), str(masks_root / m) if m else None, m, names[r], extra,
                      wants_dicom(r, options.dicom)) for r, m in pairs]
    return Pairs(tasks, images_root, masks_root)


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



def from_manifest(manifest: Path, glob: str | None, input_root: Path | None = None, out: Path | None = None,
                  in_place: bool = False) -> Pairs:
    """The image-mask pairs a manifest names, and its columns beyond lungkit's own (a label file's source,
    licence, finding, ...) keyed by path, to be carried into the variants manifest. A mask path that leads out
    of the run is left as written: `_process_pair` makes it an error row."""
    if not manifest.is_file():
        raise LungkitError(f"manifest not found: {manifest}")
    if out is not None and (out / MANIFEST_NAME).resolve() == manifest.resolve() and not in_place:
        raise LungkitError(f"{out} holds the input manifest; choose another --out or pass --in-place to replace it")
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
        tasks.append(PairTask(r["path"], str(run.input_root / r["path"]), mask, mask_rel, names[r["path"]],
                           {k: r.get(k) for k in _CARRIED}, wants_dicom(r["path"], dicom=True)))
    own = {f.name for f in FIELDS}
    others = [c for c in source.column_names if c not in own]
    if run.meta.get("command") == "segment":  # the same masks: the model's verdicts on them stand
        others += [c for c in SEGMENT_TRUST if c in source.column_names]
    carried = source.select(["path", *others]) if others else None
    return Pairs(tasks, run.input_root, run.masks_root, carried, manifest)


def from_chexmask(options: VariantsOptions, images: str | Path | None) -> Pairs:
    """The pairs of a CheXmask CSV and its images; the note says how the rows met the images and how many
    --min-rca dropped. Only images that have a row are processed; CheXmask outlines the visible lungs (jsrt)."""
    if options.convention not in (None, "jsrt"):
        raise LungkitError(f"--convention {options.convention} contradicts --chexmask: CheXmask's masks outline the "
                           "visible lung fields (jsrt)")
    if images is None or not Path(images).is_dir():
        raise LungkitError("--chexmask needs the folder of the images it describes: give --images")
    images = Path(images)
    # two passes: ids first, then the run-length strings of the matched rows only (a CheXmask CSV is GBs)
    ids = chexmask.read_csv(options.chexmask, options.chexmask_id, options.min_rca, with_masks=False)
    rels = find_images(images, options.glob, options.dicom)
    matches = chexmask.match_images(ids.rows, rels)
    wanted = {row.image_id for row in matches.matched.values()}
    full = {row.image_id: row for row in chexmask.read_csv(options.chexmask, ids.id_column, options.min_rca,
                                                           only_ids=wanted).rows}
    names = output_names(sorted(matches.matched))
    tasks = [PairTask(rel, str(images / rel), None, None, names[rel], {"convention": "jsrt"}, wants_dicom(rel, options.dicom),
                   chexmask=full[row.image_id]) for rel, row in sorted(matches.matched.items())]
    matches.unreadable = ids.unreadable
    note = matches.note() + (f", {ids.dropped} below --min-rca {options.min_rca:g}" if options.min_rca is not None else "")
    return Pairs(tasks, images, Path(options.chexmask).parent, note=note)


def from_dataset(dataset: Path, glob: str | None, input_root: Path | None) -> Pairs:
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
        tasks.append(PairTask(r["path"], str(images_root / r["path"]), None, None, names[r["path"]], {k: r.get(k) for k in _CARRIED},
                           wants_dicom(r["path"], dicom=True), mask_rle=r["mask_rle"], expected_sha256=r.get("sha256")))
    others = [c for c in table.column_names if c not in own and c != "mask_rle"]
    return Pairs(tasks, images_root, dataset, table.select(["path", *others]) if others else None)

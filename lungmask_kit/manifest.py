"""The Parquet manifest: one row per input image, written in atomic parts and merged at the end.

An interrupted run leaves `OUT/.manifest-parts/part-*.parquet` behind; the next run reads them (and any
merged manifest) to resume, so at most the batch in flight is lost. Column meanings: manifests/SCHEMA.md.
"""

from __future__ import annotations

import errno
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import TMP_PREFIX, atomic_write_bytes, inside, path_in

PARTS_DIR = ".manifest-parts"
SCHEMA_VERSION = "lungkit-manifest/1"

# a mask as a COCO run-length encoding (lungmask_kit.rle): the per-lung columns and publish's mask_rle
RLE_TYPE = pa.struct([("size", pa.list_(pa.int32())), ("counts", pa.string())])

SEGMENT_FIELDS = [
    pa.field("path", pa.string(), nullable=False),
    pa.field("sha256", pa.string()),
    pa.field("file_bytes", pa.int64()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bit_depth", pa.int8()),
    pa.field("source_channels", pa.int8()),
    pa.field("mask_path", pa.string()),
    pa.field("lungs_path", pa.string()),
    pa.field("nolungs_path", pa.string()),
    pa.field("dicom_seg_path", pa.string()),  # segment --dicom-seg: the DICOM Segmentation of a DICOM input
    pa.field("lung_area_fraction", pa.float64()),
    pa.field("n_components", pa.int32()),
    pa.field("convention", pa.string()),  # which lung the mask outlines: v7 (behind the heart included) | jsrt
    # the patient's right lung (the image's left in a PA/AP view) and left lung: disjoint, their union the mask
    pa.field("right_lung_rle", RLE_TYPE),
    pa.field("left_lung_rle", RLE_TYPE),
    pa.field("right_lung_fraction", pa.float64()),
    pa.field("left_lung_fraction", pa.float64()),
    pa.field("right_lung_mm2", pa.float64()),  # where pixel_spacing is known
    pa.field("left_lung_mm2", pa.float64()),
    # a model with a heart output: the heart mask (PNG and RLE) and the cardiothoracic ratio (SCHEMA.md)
    pa.field("heart_path", pa.string()),
    pa.field("heart_rle", RLE_TYPE),
    pa.field("heart_fraction", pa.float64()),
    pa.field("heart_mm2", pa.float64()),
    pa.field("heart_width_px", pa.int32()),  # widest horizontal extent of the heart at native size
    pa.field("thorax_width_px", pa.int32()),  # widest horizontal extent of both visible (jsrt) lungs
    pa.field("ctr", pa.float64()),  # heart_width_px / thorax_width_px; null where not frontal or not measurable
    pa.field("ctr_null_reason", pa.string()),
    pa.field("ood_score", pa.float64()),
    pa.field("ood_image_score", pa.float64()),
    pa.field("view_guess", pa.string()),  # the view gate's guess: frontal, lateral, cross-sectional, other
    pa.field("ood_shape_score", pa.float64()),
    pa.field("est_dice", pa.float64()),
    pa.field("qc_pass", pa.bool_()),
    pa.field("qc_reason", pa.string()),
    pa.field("status", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("settings_key", pa.string()),
    pa.field("label", pa.string()),
    pa.field("patient_id", pa.string()),  # a label file's, else a DICOM's PatientID
    pa.field("split", pa.string()),
    # from a DICOM header (or a label file's column of the same name); null for other images
    pa.field("view", pa.string()),
    pa.field("modality", pa.string()),
    pa.field("study_uid", pa.string()),
    pa.field("series_uid", pa.string()),
    pa.field("sop_uid", pa.string()),
    pa.field("pixel_spacing", pa.list_(pa.float64())),  # [row, column] mm: PixelSpacing, else ImagerPixelSpacing
]

VARIANTS_EXTRA_FIELDS = [
    pa.field("mask_sha256", pa.string()),
    pa.field("crop_box", pa.list_(pa.int32())),
    # where the mask came from when not a file: "chexmask" (and its size when it was resized to the image)
    pa.field("mask_source", pa.string()),
    pa.field("mask_quality", pa.float64()),  # the source's own quality index: CheXmask's Dice RCA (Mean)
]


def schema(fields: list[pa.Field], metadata: dict | None = None) -> pa.Schema:
    meta = {"lungkit": json.dumps({"schema": SCHEMA_VERSION, **(metadata or {})}, sort_keys=True)}
    return pa.schema(fields, metadata=meta)


class Row(dict):
    """A manifest row: a dict whose keys must be columns of its schema, so a misspelt key fails where it is
    set instead of vanishing from the manifest. Subclasses name their columns (`row_type`)."""

    columns: frozenset[str] = frozenset()

    def __init__(self, *args, **kwargs):
        super().__init__()
        self.update(*args, **kwargs)

    def __setitem__(self, key: str, value) -> None:
        if key not in self.columns:
            raise KeyError(f"{key!r} is not a column of {type(self).__name__}")
        super().__setitem__(key, value)

    def update(self, *args, **kwargs) -> None:
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default=None):
        if key not in self:
            self[key] = default
        return self[key]

    def __or__(self, other):  # row | {...} stays checked
        new = type(self)(self)
        new.update(other)
        return new


def row_type(name: str, fields: list[pa.Field]) -> type[Row]:
    return type(name, (Row,), {"columns": frozenset(f.name for f in fields)})


SegmentRow = row_type("SegmentRow", SEGMENT_FIELDS)
VariantsRow = row_type("VariantsRow", SEGMENT_FIELDS + VARIANTS_EXTRA_FIELDS)


def to_table(rows: list[dict], fields: list[pa.Field], metadata: dict | None = None) -> pa.Table:
    """Rows -> a table of `fields`. A key that is not one of them is an error, never silently dropped."""
    names = [f.name for f in fields]
    unknown = set().union(*rows) - set(names) if rows else set()
    if unknown:
        raise KeyError(f"not manifest columns: {', '.join(sorted(unknown))}")
    columns = {n: [r.get(n) for r in rows] for n in names}
    return pa.Table.from_pydict(columns, schema=schema(fields, metadata))


def write_table(table: pa.Table, path: str | Path) -> None:
    """Atomic Parquet write (zstd): readers never see a half-written manifest. A full or read-only disk is a
    one-line error (exit 2); the previous file stays intact."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    try:
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
    except OSError as err:
        full = " (disk full)" if err.errno == errno.ENOSPC else ""
        raise LungkitError(f"cannot write {path}: {err.strerror or err}{full}") from err


class PartWriter:
    """Appends batches of rows as Parquet parts under OUT/.manifest-parts/, named by the time they were written
    (part-<ns>-<writer>.parquet): sorted by name they are in write order, so the last row for an image wins
    across runs, and shards writing side by side never pick the same name."""

    def __init__(self, out: Path, fields: list[pa.Field], tag: str | None = None):
        self.dir = out / PARTS_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fields = fields
        self.tag = tag or f"p{os.getpid()}"
        self._last = 0

    def write(self, rows: list[dict]) -> None:
        if rows:
            self._last = max(time.time_ns(), self._last + 1)
            write_table(to_table(rows, self.fields), self.dir / f"part-{self._last:020d}-{self.tag}.parquet")


def carry_columns(table: pa.Table, carried: pa.Table) -> pa.Table:
    """`table` with `carried`'s columns other than path joined on path: a column `table` has is replaced where it
    stands (values and type), the others appended; paths `carried` lacks get nulls. Row order is kept."""
    names = [c for c in carried.column_names if c != "path"]
    index = {p: i for i, p in enumerate(carried.column("path").to_pylist())}
    take = pa.array([index.get(p) for p in table.column("path").to_pylist()], pa.int64())
    for name in names:
        values = carried.column(name).take(take)
        if name in table.column_names:
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(i).with_type(values.type), values)
        else:
            table = table.append_column(carried.schema.field(name), values)
    return table


def folder_entries(key: str, folder: str | Path, out: str | Path) -> dict[str, str]:
    """Where a folder was, for the manifest's metadata: relative to the output folder when it can be (so a
    corpus moved together with its inputs still resolves), and absolute as well."""
    absolute = os.path.realpath(folder)
    try:
        relative = Path(os.path.relpath(absolute, os.path.realpath(out))).as_posix()
    except ValueError:  # another drive (Windows): only the absolute path exists
        relative = absolute
    return {key: relative, f"{key}_absolute": absolute}


def resolve_folder(manifest: str | Path, meta: dict, key: str = "input_root", override: str | Path | None = None) -> Path:
    """The folder a manifest's `key` names: `override` (--input-root) if given; else the path relative to the
    manifest's folder if it exists there; else the absolute path recorded (the output folder moved alone)."""
    if override is not None:
        return Path(override)
    recorded = meta.get(key)
    if recorded is None:
        return Path(manifest).parent
    candidate = Path(manifest).parent / recorded
    absolute = meta.get(f"{key}_absolute")
    if not candidate.is_dir() and absolute and Path(absolute).is_dir():
        return Path(absolute)
    return candidate


MANIFEST_NAME = "manifest.parquet"  # a run folder's manifest (segment and variants)
RUN_COMMANDS = ("segment", "variants")  # the commands whose manifests describe a finished run


@dataclass
class RunManifest:
    """A finished segment or variants run, as every command that reads one starts from it: the manifest's
    columns (a pyarrow table: no Python object per row, so memory stays small on a 377k-row corpus), its
    metadata, and where its files are. Paths in it are untrusted: they reach the disk only through
    `input_file`, `mask_file` and `output_file`, which keep them inside the folder they belong to."""

    path: Path  # the manifest file
    meta: dict
    table: pa.Table
    input_root: Path  # the original images
    masks_root: Path  # the masks: the run folder (segment) or the folder variants read them from

    @property
    def run(self) -> Path:
        return self.path.parent

    @property
    def n(self) -> int:
        return self.table.num_rows

    def has(self, name: str) -> bool:
        return name in self.table.column_names and self.table.column(name).null_count < self.n

    def value(self, name: str, i: int):
        return self.table.column(name)[int(i)].as_py() if name in self.table.column_names else None

    def values(self, name: str, rows) -> list:
        """A column's Python values at some row numbers (None for a column the manifest lacks)."""
        if name not in self.table.column_names:
            return [None] * len(rows)
        return self.table.column(name).take(pa.array(rows, pa.int64())).to_pylist()

    def numbers(self, name: str) -> np.ndarray:
        """A numeric column as float64, NaN where null (all NaN for a column the manifest lacks)."""
        if name not in self.table.column_names:
            return np.full(self.n, np.nan)
        return self.table.column(name).cast("float64").to_numpy(zero_copy_only=False)

    def equals(self, name: str, value) -> np.ndarray:
        """Bool per row: the column holds `value` (null is not equal)."""
        if name not in self.table.column_names:
            return np.zeros(self.n, bool)
        return pc.fill_null(pc.equal(self.table.column(name), value), False).to_numpy(zero_copy_only=False)

    def input_file(self, rel: str | None) -> Path:
        """An original image (`path`); OutsidePathError if the manifest's path would leave the input folder."""
        return path_in(self.input_root, rel)

    def mask_file(self, rel: str | None) -> Path:
        """A mask (`mask_path`): one the run wrote must resolve inside the run; a variants run's folder masks
        are the user's files, held to their folder by name."""
        return path_in(self.masks_root, rel, own=inside(self.masks_root, self.run))

    def output_file(self, rel: str | None) -> Path:
        """A file the run wrote (`lungs_path`, `nolungs_path`), inside the run folder."""
        return path_in(self.run, rel, own=True)


def open_run(run: str | Path, input_root: str | Path | None = None, columns: tuple[str, ...] | None = None
             ) -> RunManifest:
    """A segment or variants run folder (or its manifest.parquet) -> RunManifest, with `columns` where the file
    has them (else all); a one-line LungkitError for anything else. `input_root` (--input-root) says where
    the original images are now."""
    run = Path(run)
    manifest = run if run.suffix == ".parquet" or run.is_file() else run / MANIFEST_NAME
    if manifest == run and not run.exists():
        raise LungkitError(f"manifest not found: {run}")
    if not manifest.is_file():
        raise LungkitError(f"{run} is not a lungkit run folder (no {MANIFEST_NAME}); give a segment or variants output")
    try:
        meta = read_metadata(manifest)
        names = pq.read_schema(manifest).names
        table = pq.read_table(manifest, columns=[c for c in columns if c in names] if columns else None)
    except (OSError, ValueError, pa.ArrowException) as err:
        raise LungkitError(f"{manifest} is not a readable Parquet manifest ({type(err).__name__})") from err
    if meta.get("command") not in RUN_COMMANDS or "status" not in table.column_names or "path" not in table.column_names:
        raise LungkitError(f"{manifest} is not a manifest of lungkit segment or variants")
    if input_root is not None and not Path(input_root).is_dir():
        raise LungkitError(f"--input-root {input_root} is not a folder")
    return RunManifest(manifest, meta, table.combine_chunks(), resolve_folder(manifest, meta, "input_root", input_root),
                       resolve_folder(manifest, meta, "masks_root"))


def read_metadata(path: str | Path) -> dict:
    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"lungkit")
    return json.loads(raw) if raw else {}


DAMAGED_DIR = ".lungkit-damaged"


def _set_aside(path: Path, out: Path, damaged: list[str] | None, why: str) -> None:
    """Move a damaged manifest or part file to OUT/.lungkit-damaged/, so that every later run (--overwrite
    included) goes on without it; the images of its rows are redone."""
    aside = out / DAMAGED_DIR / f"{path.name}.{time.strftime('%Y%m%dT%H%M%S')}.{os.getpid()}"
    aside.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if damaged is not None:
        damaged.append(f"{path.relative_to(out)} is damaged ({why}); set aside as {aside.relative_to(out)}, its images are redone")


def _previous_tables(out: Path, manifest_name: str, fields: list[pa.Field], damaged: list[str] | None) -> list[pa.Table]:
    names = [f.name for f in fields]
    tables = []
    manifest = out / manifest_name
    candidates = ([manifest] if manifest.is_file() else []) + sorted((out / PARTS_DIR).glob("part-*.parquet"))
    for p in candidates:
        try:
            t = pq.read_table(p)
            if not {"path", "status"} <= set(t.column_names):
                raise ValueError("no path and status columns")
            for f in fields:  # a column added since that file was written reads as null
                if f.name not in t.column_names:
                    t = t.append_column(f, pa.nulls(len(t), f.type))
            known = t.select(names).cast(pa.schema(fields))
            for extra in (c for c in t.column_names if c not in names):  # e.g. a label file's source column
                known = known.append_column(extra, t.column(extra))
            tables.append(known)
        except (pa.ArrowException, OSError, ValueError) as err:
            _set_aside(p, out, damaged, type(err).__name__)
    return tables


def previous_table(out: Path, manifest_name: str, fields: list[pa.Field], damaged: list[str] | None = None) -> pa.Table | None:
    """Rows of earlier (possibly interrupted) runs: the merged manifest then its parts; last write wins.
    Damaged files are set aside and named in `damaged`."""
    tables = _previous_tables(out, manifest_name, fields, damaged)
    if not tables:
        return None
    table = pa.concat_tables(tables, promote_options="default")  # extra columns: null where absent
    table = table.append_column("_order", pa.array(range(len(table)), pa.int64()))
    last = table.group_by("path").aggregate([("_order", "max")])["_order_max"]
    keep = pc.take(last, pc.sort_indices(last))  # row numbers of each path's last write, in write order
    return table.take(keep).drop_columns(["_order"])


class MissingRowsError(RuntimeError):
    """Images that should have a row have none: a bug after a plain run; after shards, a shard not finished."""

    def __init__(self, paths: list[str]):
        super().__init__(f"internal error: no manifest row for {len(paths)} image(s), e.g. {paths[0]}")
        self.paths = paths


def finalize(out: Path, manifest_name: str, paths: list[str], fields: list[pa.Field], metadata: dict,
             update=None, keep_other: Callable[[str], bool] | None = None,
             damaged: list[str] | None = None) -> tuple[pa.Table, list[dict]]:
    """Merge the manifest and its parts into one atomic Parquet file with a row for each of `paths`, plus the
    earlier rows of other paths that `keep_other(path)` keeps (e.g. another --glob's images); sorted by path.
    Apply `update(table) -> table` (e.g. QC re-flagging), then drop the parts.
    Returns (table, earlier rows dropped), so the caller can remove the outputs those rows name."""
    table = previous_table(out, manifest_name, fields, damaged)
    if table is None:
        table = to_table([], fields)
    previous = table.column("path").to_pylist()
    index = {p: i for i, p in enumerate(previous)}
    missing = [p for p in paths if p not in index]
    if missing:
        raise MissingRowsError(missing)
    wanted = set(paths)
    others = [p for p in previous if p not in wanted]
    kept = [p for p in others if keep_other is not None and keep_other(p)]
    dropped_paths = set(others) - set(kept)
    dropped = table.take(pa.array([index[p] for p in others if p in dropped_paths], pa.int64())).to_pylist()
    table = table.take(pa.array([index[p] for p in sorted(wanted | set(kept))], pa.int64()))
    if update is not None:
        table = update(table)
    table = table.replace_schema_metadata(schema(fields, metadata).metadata)
    write_table(table, out / manifest_name)
    parts = out / PARTS_DIR
    if parts.is_dir():
        for p in parts.iterdir():
            if p.name.startswith(("part-", "shard-", TMP_PREFIX)):
                os.unlink(p)
        try:
            parts.rmdir()
        except OSError:
            pass
    return table, dropped

"""`lungkit publish`: a run folder -> a derived corpus others can load, verify and cite.

Full mode writes Parquet shards per split whose image columns (image, mask, lungs, nolungs) are Hugging Face
`Image` features (PNG bytes); masks-only mode writes the masks as COCO run-length encodings with each source
image's relative path and sha256, for sources whose images may not be redistributed. Both add a dataset card,
`croissant.json` and `SHA256SUMS`. The dataset is built in `.DATASET.lungkit-partial` beside it, shard by shard
(a killed run resumes from its last finished shard), and swapped into place whole.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lungmask_kit import chexmask, rle
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import atomic_write_bytes, digest, staged_folder
from lungmask_kit.manifest import RunManifest, open_run
from lungmask_kit.publish.card import write_card, write_croissant, write_sha256sums
from lungmask_kit.publish.payload import full_payload, masks_payload
from lungmask_kit.publish.schema import (
    HF_IMAGE,
    HEART_IMAGE,
    IDENTIFIER_COLUMNS,
    IMAGE_COLUMNS,
    RLE,
    PublishOptions,
    PublishSummary,
    hf_schema_metadata,
    image_columns,
)
from lungmask_kit.runfolder import reading_run
from lungmask_kit.runtime import available_cores

MARKER = ".lungkit-dataset"  # a folder holding it is ours to replace
PROGRESS = ".progress.json"
# manifest columns that only mean something inside the run folder, or on rows never published
RUN_ONLY = ("status", "error", "mask_path", "lungs_path", "nolungs_path", "heart_path", "dicom_seg_path")
PUBLISHED_PATH = "_published_path"  # the path others see (full mode: identifiers in it replaced), until the swap
ROW_GROUP_BYTES = 64 << 20  # image bytes per Parquet row group: readers hold one row group at a time
READ_CHUNK = 64  # rows read ahead in threads
MAX_SPLIT_NAME = 64  # characters of a split name (it is part of every shard's file name)


def eligible(table: pa.Table, include_flagged: bool) -> tuple[pa.Table, int, int]:
    """(rows to publish, flagged rows left out, failed rows left out): failed never, flagged unless asked."""
    ok = pc.fill_null(pc.equal(table.column("status"), "ok"), False)
    flagged = pc.fill_null(pc.equal(table.column("qc_pass"), False), False) if "qc_pass" in table.column_names else pc.equal(ok, False)
    keep = ok if include_flagged else pc.and_(ok, pc.invert(flagged))
    n_failed = len(table) - pc.sum(ok).as_py() if len(table) else 0
    n_flagged = 0 if include_flagged else pc.sum(pc.and_(ok, flagged)).as_py() or 0
    return table.filter(keep), n_flagged, n_failed


def split_names(table: pa.Table) -> list[str]:
    """Each row's split: its `split` value made a valid Hugging Face split name; rows without one are `train`
    when no row has a split, else `unassigned`. At most MAX_SPLIT_NAME characters (a long value is cut and
    told apart by a hash of itself)."""
    values = table.column("split").to_pylist() if "split" in table.column_names else [None] * len(table)
    default = "train" if all(v is None for v in values) else "unassigned"
    return [_split_name(v) or default if v else default for v in values]


def _split_name(value: str) -> str:
    name = re.sub(r"\W+", "_", value, flags=re.ASCII).strip("_")
    if len(name) > MAX_SPLIT_NAME:
        name = name[: MAX_SPLIT_NAME - 9].rstrip("_") + "_" + hashlib.sha1(value.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return name


def publish(run: str | Path, dataset: str | Path, options: PublishOptions | None = None) -> PublishSummary:
    """`lungkit publish RUN -o DATASET`. RUN is held (`runfolder.reading_run`) while it is read."""
    with reading_run(run, "publish"):
        return _publish(run, dataset, options or PublishOptions())


def _publish(run: str | Path, dataset: str | Path, options: PublishOptions) -> PublishSummary:
    t0 = time.perf_counter()
    source = open_run(run, options.input_root)
    dataset = Path(dataset)
    table, n_flagged, n_failed = eligible(source.table, options.include_flagged)
    if table.num_rows == 0:
        raise LungkitError(f"nothing to publish in {source.path}: no image passed QC and ran without error "
                           "(--include-flagged also publishes flagged images)")
    if options.chexmask and "convention" in table.column_names:
        other = sorted({c for c in table.column("convention").to_pylist() if c and c != "jsrt"})
        if other:
            raise LungkitError(f"--chexmask: the run's masks are {', '.join(other)} (the lung behind the heart included) "
                               "and CheXmask's readers take every mask as visible lung fields (jsrt): segment with "
                               "--convention jsrt for a chexmask.csv")
    splits = split_names(table)
    table = table.drop_columns(["split"]) if "split" in table.column_names else table
    table = table.append_column("split", pa.array(splits, pa.string()))
    summary = PublishSummary(str(dataset), "masks-only" if options.masks_only else "full",
                             excluded_flagged=n_flagged, excluded_failed=n_failed)
    # a killed build resumes from .DATASET.lungkit-partial (kept on failure); one build per DATASET at a time
    with staged_folder(dataset, source.run, MARKER, "lungkit publish", resumable=True, warnings=summary.warnings) as staging:
        state = _Progress.open(staging, _publish_key(source, options))
        if not options.keep_identifiers:
            if not options.masks_only:  # masks-only keeps paths: they are how its users find their images
                table, summary.paths_pseudonymised = pseudonymise_paths(table, state.pseudonym_key)
            table, summary.pseudonymised = pseudonymise(table, state.pseudonym_key)
        rows_of: dict[str, list[int]] = {}
        for i, split in enumerate(splits):
            rows_of.setdefault(split, []).append(i)
        for split, rows in sorted(rows_of.items()):
            summary.resumed_shards += _write_split(source, table.take(pa.array(rows, pa.int64())), split, staging, state, options)
            summary.rows[split] = len(rows)
        if options.chexmask:
            write_chexmask_csv(staging / CHEXMASK_CSV, public_paths(table))
        files = sorted(p.relative_to(staging).as_posix() for p in (staging / "data").glob("*.parquet"))
        published = _published_columns(table, options)
        write_card(staging, source, published, summary, options, files)
        write_croissant(staging, source, published, summary, options, files)
        (staging / MARKER).write_text("a dataset written by `lungkit publish`; a re-run replaces this folder whole\n")
        state.remove()
        write_sha256sums(staging)
    if not options.license and not any(c in source.table.column_names for c in ("license", "licence")):
        summary.warnings.append("the images' licence is unknown (no license column, no --license): the card says "
                                "`unknown`; find out before sharing the dataset")
    files_out = [p for p in dataset.rglob("*") if p.is_file()]
    summary.files, summary.total_bytes = len(files_out), sum(p.stat().st_size for p in files_out)
    summary.seconds = time.perf_counter() - t0
    return summary


CHEXMASK_CSV = "chexmask.csv"


def write_chexmask_csv(path: Path, table: pa.Table) -> None:
    """The published masks in CheXmask's layout: `Path` (the image's relative path), `Right Lung` and `Left Lung`
    from the run's per-lung masks, `Heart` from its heart mask (empty where the model draws none), `Height`,
    `Width`, and lungkit's est_dice in CheXmask's `Dice RCA (Mean)` column (an estimate of the same kind of
    quantity; the card says so)."""
    if not {"right_lung_rle", "left_lung_rle"} <= set(table.column_names):
        raise LungkitError("--chexmask needs the run's right and left lung masks (right_lung_rle, left_lung_rle): "
                           "segment again with this lungkit")
    out = []
    for r in table.select([c for c in ("path", "right_lung_rle", "left_lung_rle", "heart_rle", "height", "width", "est_dice")
                           if c in table.column_names]).to_pylist():
        if not r.get("right_lung_rle") or not r.get("left_lung_rle"):
            continue  # a row without per-lung masks (failed rows are never published)
        right, left = rle.decode(r["right_lung_rle"]), rle.decode(r["left_lung_rle"])
        out.append({"Path": r["path"], chexmask.RIGHT: chexmask.encode(right), chexmask.LEFT: chexmask.encode(left),
                    chexmask.HEART: chexmask.encode(rle.decode(r["heart_rle"])) if r.get("heart_rle") else "",
                    "Height": right.shape[0], "Width": right.shape[1],
                    chexmask.RCA_MEAN: "" if r.get("est_dice") is None else f"{r['est_dice']:.4f}"})
    chexmask.write_csv(path, out)


_UID = re.compile(r"^\d+(\.\d+){3,}$")  # a DICOM UID as PACS exports name files and folders by them


def pseudonymise_paths(table: pa.Table, key: bytes) -> tuple[pa.Table, int]:
    """The paths others see, as a `PUBLISHED_PATH` column (the run's own `path` stays for reading the files): each
    folder or file name that equals one of the table's identifier values (patient ids, DICOM UIDs) or looks like a
    DICOM UID is replaced by its keyed pseudonym (the extension kept), e.g. `PAT123/1.2.840.../x.dcm` ->
    `anon-.../anon-....dcm`. Returns the table and how many paths changed."""
    values = set()
    for name in IDENTIFIER_COLUMNS:
        if name in table.column_names:
            values |= {str(v).strip() for v in table.column(name).to_pylist() if v is not None and len(str(v).strip()) >= 3}

    def name_of(part: str) -> str:
        stem, dot, ext = part.rpartition(".") if "." in part and not _UID.match(part) else (part, "", "")
        for candidate, suffix in ((part, ""), (stem, dot + ext)):
            if candidate in values or _UID.match(candidate):
                return "anon-" + hmac.new(key, f"path:{candidate}".encode(), hashlib.sha256).hexdigest()[:16] + suffix
        return part

    paths = table.column("path").to_pylist()
    public = ["/".join(name_of(part) for part in p.split("/")) for p in paths]
    return table.append_column(PUBLISHED_PATH, pa.array(public, pa.string())), sum(a != b for a, b in zip(paths, public))


def public_paths(table: pa.Table) -> pa.Table:
    """`table` with `path` as others see it (`PUBLISHED_PATH` where there is one) and no private columns."""
    if PUBLISHED_PATH not in table.column_names:
        return table
    i = table.schema.get_field_index("path")
    return table.set_column(i, table.schema.field(i), table.column(PUBLISHED_PATH)).drop_columns([PUBLISHED_PATH])


def pseudonymise(table: pa.Table, key: bytes) -> tuple[pa.Table, list[str]]:
    """The identifier columns (patient ids, DICOM UIDs) replaced by keyed hashes: equal values stay equal within
    the dataset (a patient's images can still be grouped), and without the key, discarded once the dataset is
    built, no value can be traced back (a plain hash of a short patient id could be by trying them all)."""
    done = []
    for name in IDENTIFIER_COLUMNS:
        if name not in table.column_names or table.column(name).null_count == len(table):
            continue
        values = [None if v is None else "anon-" + hmac.new(key, f"{name}:{v}".encode(), hashlib.sha256).hexdigest()[:16]
                  for v in table.column(name).to_pylist()]
        i = table.schema.get_field_index(name)
        table = table.set_column(i, pa.field(name, pa.string()), pa.array(values, pa.string()))
        done.append(name)
    return table, done


def _published_columns(table: pa.Table, options: PublishOptions) -> pa.Table:
    """The manifest's columns others get: its run-folder paths and status columns dropped (in masks-only mode
    too: the dataset holds none of the files they name), `path` as others see it."""
    return public_paths(table).drop_columns([c for c in RUN_ONLY if c in table.column_names])


def _publish_key(source: RunManifest, options: PublishOptions) -> str:
    """What a partial build must share with this one to be resumed: the manifest's bytes and the options that
    change the shards."""
    manifest_sha = hashlib.sha256(source.path.read_bytes()).hexdigest()
    return digest([manifest_sha, options.masks_only, options.include_flagged, options.shard_mb, options.keep_identifiers, 4])


class _Progress:
    """The shards a partial build finished, per split, in `.progress.json` inside the staging folder."""

    def __init__(self, staging: Path, key: str, done: dict, pseudonym_key: bytes):
        self.staging, self.key, self.done, self.pseudonym_key = staging, key, done, pseudonym_key

    @classmethod
    def open(cls, staging: Path, key: str) -> "_Progress":
        path = staging / PROGRESS
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            saved = {}
        if saved.get("key") != key or "pseudonym_key" not in saved:  # another manifest or other options: start over
            shutil.rmtree(staging, ignore_errors=True)
            # the shards written so far used this key: it must survive a resume, and go with the staging folder
            saved = {"done": {}, "pseudonym_key": secrets.token_hex(32)}
        (staging / "data").mkdir(parents=True, exist_ok=True)
        state = cls(staging, key, saved["done"], bytes.fromhex(saved["pseudonym_key"]))
        state._save()
        listed = {f for d in state.done.values() for f, _ in d.get("shards", [])}
        for stray in (staging / "data").iterdir():  # a shard being written when the run was killed
            if stray.name not in listed:
                stray.unlink()
        return state

    def shards(self, split: str) -> list[tuple[str, int]]:
        return [tuple(s) for s in self.done.get(split, {}).get("shards", [])]

    def add(self, split: str, name: str, rows: int) -> None:
        self.done.setdefault(split, {"shards": [], "complete": False})["shards"].append([name, rows])
        self._save()

    def finish(self, split: str, renamed: list[tuple[str, int]]) -> None:
        self.done[split] = {"shards": [list(s) for s in renamed], "complete": True}
        self._save()

    def complete(self, split: str) -> bool:
        return bool(self.done.get(split, {}).get("complete"))

    def _save(self) -> None:
        atomic_write_bytes(self.staging / PROGRESS, json.dumps(
            {"key": self.key, "done": self.done, "pseudonym_key": self.pseudonym_key.hex()}).encode())

    def remove(self) -> None:
        (self.staging / PROGRESS).unlink(missing_ok=True)


def _write_split(source: RunManifest, table: pa.Table, split: str, staging: Path, state: _Progress,
                 options: PublishOptions) -> int:
    """The split's shards, resuming after the ones a killed run finished; returns how many were reused."""
    if state.complete(split):
        return len(state.shards(split))
    done = state.shards(split)
    start = sum(rows for _, rows in done)
    writer = _ShardWriter(staging / "data", split, len(done), options, state)
    rows = table.slice(start)
    pending = _row_payloads(source, rows, options)
    for batch in pending:
        writer.add(batch)
    writer.close()
    shards = state.shards(split)
    renamed = []
    for k, (name, n) in enumerate(shards):  # the Hugging Face convention: split-00000-of-00003.parquet
        final = f"{split}-{k:05d}-of-{len(shards):05d}.parquet"
        os.replace(staging / "data" / name, staging / "data" / final)
        renamed.append((final, n))
    state.finish(split, renamed)
    return len(done)


def _row_payloads(source: RunManifest, rows: pa.Table, options: PublishOptions):
    """The split's rows in chunks, each a pyarrow table with its image or RLE columns added; files are read in
    threads, at most READ_CHUNK rows ahead."""
    make = masks_payload if options.masks_only else full_payload
    columns = image_columns(rows)  # decided for the whole split: every shard has the same schema
    workers = options.workers or available_cores()
    records = rows.to_pylist() if rows.num_rows <= READ_CHUNK else None
    with ThreadPoolExecutor(workers, thread_name_prefix="lungkit-publish") as pool:
        for start in range(0, rows.num_rows, READ_CHUNK):
            chunk = records[start:start + READ_CHUNK] if records is not None else rows.slice(start, READ_CHUNK).to_pylist()
            extra = list(pool.map(lambda r: make(source, r, strip_text=not options.keep_identifiers), chunk))
            yield _chunk_table(rows.slice(start, READ_CHUNK), extra, options, columns)


def _chunk_table(rows: pa.Table, extra: list[dict], options: PublishOptions, columns: tuple[str, ...] = IMAGE_COLUMNS
                 ) -> pa.Table:
    """The published rows of a chunk: the manifest's columns others get, then the images (`columns`) or the RLE."""
    rows = _published_columns(rows, options)
    rows = rows.drop_columns([c for c in ("mask_rle", *IMAGE_COLUMNS, HEART_IMAGE) if c in rows.column_names])
    if options.masks_only:
        return rows.append_column(pa.field("mask_rle", RLE), pa.array([e["mask_rle"] for e in extra], RLE))
    for name in columns:
        rows = rows.append_column(pa.field(name, HF_IMAGE), pa.array([e[name] for e in extra], HF_IMAGE))
    return rows


class _ShardWriter:
    """Rows into `split-NNNNN.parquet` files of about shard_mb, row groups of about ROW_GROUP_BYTES; each
    finished shard is recorded in the progress file, so a killed run resumes after it."""

    def __init__(self, folder: Path, split: str, index: int, options: PublishOptions, state: _Progress):
        self.folder, self.split, self.index, self.state = folder, split, index, state
        self.limit = options.shard_mb << 20
        self.group_limit = min(ROW_GROUP_BYTES, self.limit)  # --shard-mb below a row group still cuts shards
        self.writer = None
        self.bytes = self.rows = 0
        self.group: list[pa.Table] = []
        self.group_bytes = 0

    def add(self, chunk: pa.Table) -> None:
        """A chunk of rows, in pieces of about a row group (a chunk of large images can exceed a small shard)."""
        step = max(1, self.group_limit // max(1, chunk.nbytes // max(1, chunk.num_rows)))
        for start in range(0, chunk.num_rows, step):
            piece = chunk.slice(start, step)
            self.group.append(piece)
            self.group_bytes += piece.nbytes
            if self.group_bytes >= self.group_limit:
                self._flush_group()
            if self.bytes >= self.limit:
                self._close_shard()

    def _flush_group(self) -> None:
        if not self.group:
            return
        table = pa.concat_tables(self.group)
        if self.writer is None:
            self.path = self.folder / f"{self.split}-{self.index:05d}.parquet"
            schema = table.schema.with_metadata(hf_schema_metadata(table.schema))
            self.writer = pq.ParquetWriter(self.path, schema, compression="zstd")
        self.writer.write_table(table.replace_schema_metadata(self.writer.schema.metadata), row_group_size=len(table))
        self.bytes += self.group_bytes
        self.rows += len(table)
        self.group, self.group_bytes = [], 0

    def _close_shard(self) -> None:
        self._flush_group()
        if self.writer is None:
            return
        self.writer.close()
        self.state.add(self.split, self.path.name, self.rows)
        self.writer, self.bytes, self.rows = None, 0, 0
        self.index += 1

    def close(self) -> None:
        self._close_shard()

"""The batch segmentation engine behind `lungkit segment`.

Pipeline (all threads; OpenCV and torch release the GIL): decode threads read, hash, decode and resize
images ahead of the model; the main thread runs the model on batches; writer threads post-process, derive
the variants and write PNGs atomically. Each finished batch becomes a manifest part, so an interrupted run
loses at most the batches in flight, and the next run skips images already done with the same content hash
and settings. Forked DataLoader workers were slower here and calling cv2.setNumThreads() in one hung.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from lungmask_kit import __version__, defaults
from lungmask_kit.derive import derive_variants
from lungmask_kit.discovery import find_images, output_names
from lungmask_kit.errors import LungkitError, NoImagesError
from lungmask_kit.fileio import atomic_write_bytes, remove_stale_temps
from lungmask_kit.imaging import ImageDecodeError, decode_image, encode_png
from lungmask_kit.manifest import SEGMENT_FIELDS, PartWriter, RunSummary, clear_parts, finalize, previous_table
from lungmask_kit.postprocess import PostprocessSettings, clean_mask, count_components, lung_area_fraction, resize_mask
from lungmask_kit.qc import QCThresholds, qc_update

MANIFEST_NAME = "manifest.parquet"
OUTPUT_DIRS = {"mask": "masks", "lungs": "lungs", "nolungs": "nolungs"}
# Bump when the bytes written for the same input and settings change.
OUTPUT_FORMAT = 2  # 2: quality columns (ood_score, est_dice)
MAX_FILE_BYTES = 1 << 30


@dataclass
class SegmentOptions:
    weights: str | Path | None = None
    device: str = "auto"
    batch_size: int = defaults.BATCH_SIZE
    workers: int = 0  # decode threads and writer threads each; 0: one per usable core
    glob: str | None = None
    labels: list[str | Path] = field(default_factory=list)
    min_lung_fraction: float = defaults.MIN_LUNG_FRACTION
    threshold: float | None = None  # None: the model config's threshold
    min_object_fraction: float = defaults.MIN_OBJECT_FRACTION
    max_hole_fraction: float = defaults.MAX_HOLE_FRACTION
    keep_largest: int = defaults.KEEP_LARGEST
    max_ood_score: float | None = None  # None: the model's calibrated gate (1.0)
    min_est_dice: float | None = None  # None: the model's calibrated default
    tta: bool = False  # a mirrored pass adds flip agreement to est_dice (masks are unchanged)
    overwrite: bool = False
    progress: bool = True


@dataclass
class _Item:
    rel: str
    row: dict
    pixels: np.ndarray | None = None
    model_input: np.ndarray | None = None
    pooled: np.ndarray | None = None
    flipped: np.ndarray | None = None


def manifest_path(rel: str) -> str:
    """File names that are not valid UTF-8 are stored with backslash escapes (Parquet strings are UTF-8)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def settings_key(weights_sha256: str, config, post: PostprocessSettings, tta: bool = False) -> str:
    """Identifies everything that changes the written files and quality columns; resume redoes images whose
    key differs. QC thresholds are not in it: they re-flag at the end of every run without re-segmenting."""
    payload = {
        "weights": weights_sha256,
        "input": [config.input_size, list(config.mean), list(config.std), config.in_channels],
        "post": post.as_dict(),
        "format": OUTPUT_FORMAT,
        "quality": config.quality and {k: v for k, v in config.quality.items() if k not in ("max_ood_score", "min_est_dice", "report")},
        "tta": tta,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def labels_update(matched: dict):
    import pyarrow as pa

    def update(table):
        paths = table.column("path").to_pylist()
        for col in ("label", "patient_id", "split"):
            values = [getattr(matched[p], col) if p in matched else None for p in paths]
            i = table.schema.get_field_index(col)
            table = table.set_column(i, table.schema.field(i), pa.array(values, pa.string()))
        return table

    return update


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / ".lungkit-write-check", b"ok")
        os.unlink(out / ".lungkit-write-check")
    except OSError as err:
        raise LungkitError(f"cannot write to output folder {out}: {err.strerror or err}") from err


class _OutputWriteError(LungkitError):
    pass


def run_segment(input_dir: str | Path, out: str | Path, options: SegmentOptions, log: Callable[[str], None] = print) -> RunSummary:
    from lungmask_kit.inference import Segmenter
    from lungmask_kit.labels import match_labels, read_labels
    from lungmask_kit.runtime import available_cores, configure_threads, resolve_device

    t_start = time.perf_counter()
    root, out = Path(input_dir), Path(out)
    if not root.is_dir():
        raise LungkitError(f"input folder not found: {root}")
    if out.resolve() == root.resolve():
        raise LungkitError("the output folder must differ from the input folder")
    label_rows = read_labels(options.labels) if options.labels else []
    rels = find_images(root, options.glob)
    out_resolved = out.resolve()
    # never read our own outputs back as inputs when --out lies inside the input folder
    rels = [r for r in rels if out_resolved not in (root / r).resolve().parents]
    if not rels:
        raise NoImagesError(f"no images found under {root}" + (f" matching {options.glob!r}" if options.glob else ""))
    _check_writable(out)
    remove_stale_temps(out)

    device = resolve_device(options.device)
    configure_threads()
    segmenter = Segmenter(options.weights, device)
    post = PostprocessSettings(
        threshold=segmenter.config.threshold if options.threshold is None else options.threshold,
        min_object_fraction=options.min_object_fraction,
        max_hole_fraction=options.max_hole_fraction,
        keep_largest=options.keep_largest,
    )
    key = settings_key(segmenter.weights_sha256, segmenter.config, post, options.tta)
    thresholds = quality_thresholds(segmenter.quality, options)
    out_names = output_names(rels)
    keys = {rel: manifest_path(rel) for rel in rels}

    done: dict[str, str] = {}  # manifest path -> sha256 of images finished with these settings
    if options.overwrite:
        clear_parts(out)
    else:
        prev = previous_table(out, MANIFEST_NAME, SEGMENT_FIELDS)
        if prev is not None:
            cols = prev.select(["path", "sha256", "status", "settings_key"]).to_pydict()
            for p, sha, status, k in zip(cols["path"], cols["sha256"], cols["status"], cols["settings_key"]):
                if status == "ok" and k == key:
                    done[p] = sha

    matched, unmatched = match_labels(list(keys.values()), label_rows)
    summary = RunSummary(found=len(rels))
    parts = PartWriter(out, SEGMENT_FIELDS)

    def output_rel(kind: str, rel: str) -> str:
        return f"{OUTPUT_DIRS[kind]}/{manifest_path(out_names[rel])}"

    def decode(rel: str) -> _Item:
        try:
            return _decode(rel)
        except Exception as err:  # an unforeseen failure costs one image, never the batch
            row = {"path": keys[rel], "status": "error", "settings_key": key,
                   "error": f"unexpected error while reading: {type(err).__name__}: {err}"}
            return _Item(rel, row)

    def _decode(rel: str) -> _Item:
        mkey = keys[rel]
        row = {"path": mkey, "status": "error", "settings_key": key}
        item = _Item(rel, row)
        try:
            src = root / rel
            size = src.stat().st_size
            if size > MAX_FILE_BYTES:
                raise ImageDecodeError(f"file too large ({size} bytes > {MAX_FILE_BYTES})")
            data = src.read_bytes()
        except OSError as err:
            row["error"] = f"cannot read file: {err.strerror or err}"
            return item
        except ImageDecodeError as err:
            row["error"] = str(err)
            return item
        sha = hashlib.sha256(data).hexdigest()
        row.update(sha256=sha, file_bytes=len(data))
        if done.get(mkey) == sha and all((out / output_rel(k, rel)).is_file() for k in OUTPUT_DIRS):
            row["status"] = "skipped"
            return item
        try:
            decoded = decode_image(data)
        except ImageDecodeError as err:
            row["error"] = str(err)
            return item
        h, w = decoded.pixels.shape
        row.update(width=w, height=h, bit_depth=decoded.bit_depth, source_channels=decoded.source_channels)
        item.pixels = decoded.pixels
        item.model_input = segmenter.prepare(decoded.pixels)
        return item

    def write(item: _Item, probability: np.ndarray) -> dict:
        row = item.row
        small = clean_mask(probability, post)
        if segmenter.quality is not None:
            flipped = None if item.flipped is None else clean_mask(item.flipped, post)
            row.update(segmenter.quality.assess(probability, small, item.pooled, flipped).as_row())
        mask = resize_mask(small, item.pixels.shape)
        images = {"mask": mask.astype(np.uint8) * 255, **derive_variants(item.pixels, mask)}
        try:
            for kind, pixels in images.items():
                atomic_write_bytes(out / output_rel(kind, item.rel), encode_png(pixels), fsync=False)
        except OSError as err:
            raise _OutputWriteError(f"cannot write outputs to {out}: {err.strerror or err}"
                                    + (" (disk full)" if err.errno == errno.ENOSPC else "")) from err
        row.update(
            mask_path=output_rel("mask", item.rel),
            lungs_path=output_rel("lungs", item.rel),
            nolungs_path=output_rel("nolungs", item.rel),
            lung_area_fraction=round(lung_area_fraction(mask), 6),
            n_components=count_components(small),
            status="ok",
            error=None,
        )
        return row

    from tqdm.auto import tqdm

    t_pipeline = time.perf_counter()
    bar = tqdm(total=len(rels), unit="img", disable=not options.progress, dynamic_ncols=True, smoothing=0.1)
    workers = options.workers or available_cores()
    batch_size = options.batch_size
    prefetch = 2 * batch_size + workers
    # every model batch has the same size, however the run was interrupted, so masks are byte-identical;
    # a folder smaller than one batch is not padded beyond its own size
    pad_to = min(batch_size, len(rels))

    def flush(batch: list[tuple[_Item, Future | None]]) -> None:
        rows = []
        for item, fut in batch:
            row = item.row
            if fut is not None:
                try:
                    row = fut.result()
                except _OutputWriteError:
                    raise
                except Exception as err:  # a bug must not cost the batch: record it on the image
                    row = {**item.row, "status": "error", "error": f"post-processing failed: {type(err).__name__}: {err}"}
            if row["status"] == "skipped":
                summary.skipped += 1
                continue  # the earlier row stays authoritative
            if row["status"] == "error":
                summary.errors.append((row["path"], row.get("error") or ""))
            rows.append(row)
        summary.processed += len(rows)
        parts.write(rows)
        bar.update(len(batch))

    with ThreadPoolExecutor(workers, thread_name_prefix="lungkit-decode") as decoder, \
            ThreadPoolExecutor(workers, thread_name_prefix="lungkit-write") as writer:
        queue: deque[Future] = deque()
        pending = iter(rels)
        in_flight: deque[list] = deque()

        def fill() -> None:
            while len(queue) < prefetch:
                rel = next(pending, None)
                if rel is None:
                    return
                queue.append(decoder.submit(decode, rel))

        fill()
        try:
            while queue:
                # a batch holds `batch_size` images for the model plus any skipped or failed ones met on the way
                batch_items: list[_Item] = []
                n_model = 0
                while queue and n_model < batch_size:
                    batch_items.append(queue.popleft().result())
                    n_model += batch_items[-1].model_input is not None
                    fill()
                to_model = [it for it in batch_items if it.model_input is not None]
                futures: dict[int, Future] = {}
                if to_model:
                    pred = segmenter.predict_batch(np.stack([it.model_input for it in to_model]), pad_to=pad_to, tta=options.tta)
                    for i, it in enumerate(to_model):
                        it.model_input = None
                        it.pooled = pred.pooled[i]
                        it.flipped = None if pred.flipped is None else pred.flipped[i]
                        futures[id(it)] = writer.submit(write, it, pred.probabilities[i])
                in_flight.append([(it, futures.get(id(it))) for it in batch_items])
                while len(in_flight) > 2:
                    flush(in_flight.popleft())
            while in_flight:
                flush(in_flight.popleft())
        except BaseException:
            for f in queue:
                f.cancel()
            raise
        finally:
            bar.close()

    def count_update(table):
        return qc_update(thresholds)(labels_update(matched)(table))

    metadata = {
        "command": "segment",
        "lungkit_version": __version__,
        "input_root": str(root.resolve()),
        "model_name": segmenter.config.name,
        "weights": segmenter.weights_path,
        "weights_sha256": segmenter.weights_sha256,
        "model_config": {k: getattr(segmenter.config, k) for k in ("arch", "encoder", "in_channels", "input_size", "mean", "std")},
        "postprocess": post.as_dict(),
        "min_lung_fraction": options.min_lung_fraction,
        "qc": thresholds.as_dict(),
        "quality": _quality_metadata(segmenter.quality, options.tta),
        "settings_key": key,
        "device": str(device),
        "batch_size": batch_size,
        "labels": [str(p) for p in options.labels],
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    table = finalize(out, MANIFEST_NAME, list(keys.values()), SEGMENT_FIELDS, metadata, update=count_update)
    summary.count(table)
    summary.uncalibrated = segmenter.quality is None
    summary.manifest = str(out / MANIFEST_NAME)
    if unmatched:
        summary.unmatched_labels = len(unmatched)
        _write_unmatched(out, unmatched)
    summary.seconds = time.perf_counter() - t_start
    summary.pipeline_seconds = time.perf_counter() - t_pipeline
    return summary


def quality_thresholds(quality, options) -> QCThresholds:
    """QC thresholds: the user's where given, else those calibrated with the model (none if uncalibrated)."""
    max_ood = options.max_ood_score if options.max_ood_score is not None else (quality and quality.max_ood_score)
    min_est = options.min_est_dice if options.min_est_dice is not None else (quality and quality.min_est_dice)
    return QCThresholds(options.min_lung_fraction, max_ood, min_est)


def _quality_metadata(quality, tta: bool) -> dict:
    if quality is None:
        return {"calibrated": False}
    return {"calibrated": True, "tta": tta, "calibration": quality.report}


def _write_unmatched(out: Path, unmatched) -> None:
    import csv
    import io

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "patient_id", "split", "label_file"])
    for r in unmatched:
        w.writerow([r.path, r.label, r.patient_id, r.split, r.source_file])
    atomic_write_bytes(out / "unmatched_labels.csv", buf.getvalue().encode())

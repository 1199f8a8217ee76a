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
from lungmask_kit.discovery import find_images, inside, output_names, output_path_problem, wants_dicom
from lungmask_kit.errors import LungkitError, NoImagesError
from lungmask_kit.fileio import InputReadError, atomic_write_bytes, read_regular_file, remove_stale_temps
from lungmask_kit.imaging import ImageDecodeError, decode_image, encode_png
from lungmask_kit.labels import write_label_report
from lungmask_kit.manifest import SEGMENT_FIELDS, PartWriter, RunSummary, finalize, folder_entries, previous_table
from lungmask_kit.postprocess import PostprocessSettings, clean_mask, count_components, lung_area_fraction, resize_mask
from lungmask_kit.qc import QCThresholds, qc_update
from lungmask_kit.runfolder import RunKind, RunLock, check_writable, claim, confined, mark, remove_outputs

MANIFEST_NAME = "manifest.parquet"
OUTPUT_DIRS = {"mask": "masks", "lungs": "lungs", "nolungs": "nolungs"}
# Bump when the bytes written for the same input and settings change.
OUTPUT_FORMAT = 2  # 2: quality columns (ood_score, est_dice)


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
    dicom: bool = False  # also read extensionless / UID-named files as DICOM (.dcm is always read)
    max_decoded_mb: int = defaults.MAX_DECODED_MB  # decoded images held ahead of the model and writers
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
    held: int = 0  # bytes taken from the run's ByteBudget


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


# header columns a label file may also give (e.g. cxr-cls's view): the label fills them where the header did not
_LABEL_FILLS = ("view", "modality", "study_uid", "series_uid", "sop_uid")


def labels_update(matched: dict):
    """A manifest update from the label files: label and split are set (null for an unlabelled image);
    patient_id is the label's, else a DICOM's PatientID; the files' other columns (source, licence, finding,
    ...) become string columns; a header column (view, modality, ...) is filled where the image had none; a
    name the manifest measures itself (width, ...) keeps the manifest's value."""
    import pyarrow as pa

    def set_strings(table, name, values):
        array = pa.array(values, pa.string())
        if name in table.column_names:
            i = table.column_names.index(name)
            return table.set_column(i, table.schema.field(i), array)
        return table.append_column(pa.field(name, pa.string()), array)

    def update(table):
        paths = table.column("path").to_pylist()
        labelled = [matched.get(p) for p in paths]
        for col in ("label", "split"):
            table = set_strings(table, col, [getattr(m, col) if m else None for m in labelled])
        own = table.column("patient_id").to_pylist()
        table = set_strings(table, "patient_id", [(m and m.patient_id) or o for m, o in zip(labelled, own)])
        extras = [dict(m.extra) if m else {} for m in labelled]
        names = sorted({k for e in extras for k in e} - ({f.name for f in SEGMENT_FIELDS} - set(_LABEL_FILLS)))
        for name in names:
            values = [e.get(name) for e in extras]
            if name in _LABEL_FILLS:
                values = [o if o is not None else v for o, v in zip(table.column(name).to_pylist(), values)]
            table = set_strings(table, name, values)
        return table

    return update


class _OutputWriteError(LungkitError):
    pass


class ByteBudget:
    """Decoded pixels held between decoding and writing, in bytes (thread-safe). The run submits more decode
    work only while the bytes held plus an estimate for the decodes in progress fit the budget, so memory is
    bounded by bytes whatever --workers and --batch-size are (one image always proceeds, however large)."""

    def __init__(self, limit: int):
        import threading

        self.limit = limit
        self.held = 0
        self.largest = 0
        self._lock = threading.Lock()

    def take(self, n: int) -> None:
        with self._lock:
            self.held += n
            self.largest = max(self.largest, n)

    def give_back(self, n: int) -> None:
        with self._lock:
            self.held -= n

    def room_for(self, undecoded: int) -> bool:
        """Whether one more decode fits, counting each decode under way as the largest image seen so far."""
        with self._lock:
            if not self.largest:  # nothing measured yet (or only skipped images): two decodes at a time
                return undecoded < 2
            return self.held + (undecoded + 1) * self.largest <= self.limit


def _footprint(pixels: np.ndarray) -> int:
    # the image plus the mask and the two variants made from it
    return pixels.nbytes * 3 + pixels.size


def _discover(root: Path, out: Path, glob: str | None, dicom: bool = False) -> list[str]:
    if not root.is_dir():
        raise LungkitError(f"input folder not found: {root}")
    if os.path.realpath(out) == os.path.realpath(root):
        raise LungkitError("the output folder must differ from the input folder")
    # never read our own outputs back as inputs when --out lies inside the input folder
    rels = [r for r in find_images(root, glob, dicom) if not inside(root / r, out)]
    if not rels:
        raise NoImagesError(f"no images found under {root}" + (f" matching {glob!r}" if glob else ""))
    return rels


def run_segment(input_dir: str | Path, out: str | Path, options: SegmentOptions, log: Callable[[str], None] = print) -> RunSummary:
    """`lungkit segment`: masks, variants and a manifest for every image under `input_dir`."""
    t_start = time.perf_counter()
    root, out = Path(input_dir), Path(out)
    rels = _discover(root, out, options.glob, options.dicom)
    check_writable(out)
    from lungmask_kit.runtime import WarningTally

    with RunLock(out), WarningTally() as tally:
        run = _SegmentRun(root, out, rels, options)
        run.pipeline()
        summary = run.finish(t_start)
    if tally.summary():
        summary.warnings.append(tally.summary())
    return summary


class _SegmentRun:
    """One locked run into OUT: resume state, the decode -> model -> write pipeline, and the final manifest."""

    def __init__(self, root: Path, out: Path, rels: list[str], options: SegmentOptions):
        from lungmask_kit.inference import Segmenter
        from lungmask_kit.labels import match_labels, read_labels
        from lungmask_kit.runtime import prepare_device

        self.root, self.out, self.rels, self.options = root, out, rels, options
        label_rows = read_labels(options.labels) if options.labels else []
        self.summary = RunSummary(found=len(rels))
        kind = RunKind("segment", os.path.realpath(root))
        replaced = claim(out, kind, MANIFEST_NAME, options.overwrite)
        # whose outputs the earlier rows name (another command's, when --overwrite replaces its run)
        self.previous_command = replaced.command if replaced else "segment"
        remove_stale_temps(out)
        self.device = prepare_device(options.device)
        self.segmenter = Segmenter(options.weights, self.device)
        mark(out, kind)  # the weights loaded: from here on the folder holds this run
        self.post = PostprocessSettings(
            threshold=self.segmenter.config.threshold if options.threshold is None else options.threshold,
            min_object_fraction=options.min_object_fraction,
            max_hole_fraction=options.max_hole_fraction,
            keep_largest=options.keep_largest,
        )
        self.key = settings_key(self.segmenter.weights_sha256, self.segmenter.config, self.post, options.tta)
        self.thresholds = quality_thresholds(self.segmenter.quality, options)
        self.out_names = output_names(rels)
        self.keys = {rel: manifest_path(rel) for rel in rels}
        self.done = self._resume_map()
        self.matched, self.unmatched, self.conflicts = match_labels(list(self.keys.values()), label_rows)
        self.parts = PartWriter(out, SEGMENT_FIELDS)
        self.budget = ByteBudget(options.max_decoded_mb << 20)

    def _resume_map(self) -> dict[str, str]:
        """manifest path -> sha256 of the images finished earlier with these settings (none with --overwrite:
        the earlier manifest stays until this run's replaces it)."""
        done: dict[str, str] = {}
        prev = None if self.options.overwrite else previous_table(self.out, MANIFEST_NAME, SEGMENT_FIELDS, self.summary.warnings)
        if prev is not None:
            cols = prev.select(["path", "sha256", "status", "settings_key"]).to_pydict()
            for p, sha, status, k in zip(cols["path"], cols["sha256"], cols["status"], cols["settings_key"]):
                if status == "ok" and k == self.key:
                    done[p] = sha
        return done

    def output_rel(self, kind: str, rel: str) -> str:
        return f"{OUTPUT_DIRS[kind]}/{manifest_path(self.out_names[rel])}"

    # --- decode threads ---
    def decode(self, rel: str) -> _Item:
        try:
            return self._decode(rel)
        except Exception as err:  # an unforeseen failure costs one image, never the batch
            row = {"path": self.keys[rel], "status": "error", "settings_key": self.key,
                   "error": f"unexpected error while reading: {type(err).__name__}: {err}"}
            return _Item(rel, row)

    def _decode(self, rel: str) -> _Item:
        row = {"path": self.keys[rel], "status": "error", "settings_key": self.key}
        item = _Item(rel, row)
        problem = output_path_problem(self.out, self.output_rel("lungs", rel))
        if problem:
            row["error"] = problem
            return item
        try:
            data = read_regular_file(self.root / rel, defaults.MAX_FILE_BYTES)
        except InputReadError as err:
            row["error"] = str(err)
            return item
        sha = hashlib.sha256(data).hexdigest()
        row.update(sha256=sha, file_bytes=len(data))
        if self.done.get(row["path"]) == sha and all((self.out / self.output_rel(k, rel)).is_file() for k in OUTPUT_DIRS):
            row["status"] = "skipped"
            return item
        try:
            decoded = decode_image(data, dicom=wants_dicom(rel, self.options.dicom))
        except ImageDecodeError as err:
            row.update(err.header, error=str(err))
            return item
        h, w = decoded.pixels.shape
        row.update(decoded.header, width=w, height=h, bit_depth=decoded.bit_depth, source_channels=decoded.source_channels)
        item.model_input = self.segmenter.prepare(decoded.model_view)
        item.pixels = decoded.pixels
        item.held = _footprint(decoded.pixels)
        self.budget.take(item.held)  # given back by write(), whatever happens there
        return item

    # --- writer threads ---
    def write(self, item: _Item, probability: np.ndarray) -> dict:
        try:
            return self._write(item, probability)
        finally:
            self.budget.give_back(item.held)
            item.pixels = item.flipped = None

    def _write(self, item: _Item, probability: np.ndarray) -> dict:
        row, out = item.row, self.out
        small = clean_mask(probability, self.post)
        if self.segmenter.quality is not None:
            flipped = None if item.flipped is None else clean_mask(item.flipped, self.post)
            row.update(self.segmenter.quality.assess(probability, small, item.pooled, flipped, self.post).as_row())
        mask = resize_mask(small, item.pixels.shape)
        images = {"mask": mask.astype(np.uint8) * 255, **derive_variants(item.pixels, mask)}
        try:
            for kind, pixels in images.items():
                atomic_write_bytes(out / self.output_rel(kind, item.rel), encode_png(pixels), fsync=False)
        except OSError as err:
            raise _OutputWriteError(f"cannot write outputs to {out}: {err.strerror or err}"
                                    + (" (disk full)" if err.errno == errno.ENOSPC else "")) from err
        row.update(
            mask_path=self.output_rel("mask", item.rel),
            lungs_path=self.output_rel("lungs", item.rel),
            nolungs_path=self.output_rel("nolungs", item.rel),
            lung_area_fraction=round(lung_area_fraction(mask), 6),
            n_components=count_components(small),
            status="ok",
            error=None,
        )
        return row

    # --- main thread ---
    def flush(self, batch: list[tuple[_Item, Future | None]], bar) -> None:
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
                self.summary.skipped += 1
                continue  # the earlier row stays authoritative
            if row["status"] == "error":
                self.summary.errors.append((row["path"], row.get("error") or ""))
            rows.append(row)
        self.summary.processed += len(rows)
        self.parts.write(rows)
        bar.update(len(batch))

    def pipeline(self) -> None:
        """Decode pool -> model batches -> writer pool -> manifest parts, with bounded work in flight. On an
        interrupt the work in flight finishes or is dropped, and no temp file is left behind."""
        from tqdm.auto import tqdm

        from lungmask_kit.runtime import available_cores

        self.t_pipeline = time.perf_counter()
        bar = tqdm(total=len(self.rels), unit="img", disable=not self.options.progress, dynamic_ncols=True, smoothing=0.1)
        workers = self.options.workers or available_cores()
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="lungkit-decode") as decoder, \
                    ThreadPoolExecutor(workers, thread_name_prefix="lungkit-write") as writer:
                self._run_batches(decoder, writer, workers, bar)
        except BaseException:
            remove_stale_temps(self.out)
            raise
        finally:
            bar.close()

    def _run_batches(self, decoder, writer, workers: int, bar) -> None:
        batch_size = self.options.batch_size
        prefetch = 2 * batch_size + workers
        # every model batch has the same size, however the run was interrupted, so masks are byte-identical;
        # a folder smaller than one batch is not padded beyond its own size
        pad_to = min(batch_size, len(self.rels))
        queue: deque[Future] = deque()
        pending = iter(self.rels)
        in_flight: deque[list] = deque()
        exhausted = False

        def fill(force: bool = False) -> None:
            """Submit decodes while the count and the byte budget allow; `force`: one regardless (nothing
            else holds memory, so one image always proceeds, however large)."""
            nonlocal exhausted
            while len(queue) < prefetch and not exhausted:
                if not force and not self.budget.room_for(sum(not f.done() for f in queue)):
                    return
                rel = next(pending, None)
                if rel is None:
                    exhausted = True
                    return
                queue.append(decoder.submit(self.decode, rel))
                force = False

        fill(force=True)
        try:
            while queue or not exhausted:
                if not queue:  # the budget is full of images being written: wait for them, then go on
                    if in_flight:
                        self.flush(in_flight.popleft(), bar)
                        fill()
                    else:
                        fill(force=True)
                    continue
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
                    pred = self.segmenter.predict_batch(np.stack([it.model_input for it in to_model]), pad_to=pad_to,
                                                        tta=self.options.tta)
                    for i, it in enumerate(to_model):
                        it.model_input = None
                        it.pooled = pred.pooled[i]
                        it.flipped = None if pred.flipped is None else pred.flipped[i]
                        futures[id(it)] = writer.submit(self.write, it, pred.probabilities[i])
                in_flight.append([(it, futures.get(id(it))) for it in batch_items])
                while len(in_flight) > 2:
                    self.flush(in_flight.popleft(), bar)
                fill()
            while in_flight:
                self.flush(in_flight.popleft(), bar)
        except BaseException:
            for f in queue:
                f.cancel()
            raise

    def finish(self, t_start: float) -> RunSummary:
        """The merged manifest: this run's rows, earlier rows of images outside this --glob, QC and labels;
        rows whose input left the input folder (all earlier rows of other images, with --overwrite) are dropped
        with their outputs."""
        s, out = self.summary, self.out

        def update(table):  # labels are (re)set only when label files were given: a plain re-run keeps them
            table = labels_update(self.matched)(table) if self.options.labels else table
            return qc_update(self.thresholds)(table)

        def keep_other(path: str) -> bool:
            return not self.options.overwrite and confined(path) and os.path.lexists(self.root / path)

        table, dropped = finalize(out, MANIFEST_NAME, list(self.keys.values()), SEGMENT_FIELDS, self._metadata(),
                                  update=update, keep_other=keep_other, damaged=s.warnings)
        remove_outputs(out, dropped, self.previous_command)
        s.removed_stale = len(dropped)
        s.count(table)
        s.uncalibrated = self.segmenter.quality is None
        s.manifest = str(out / MANIFEST_NAME)
        s.output_folders = [str(out / d) for d in OUTPUT_DIRS.values()]
        if self.unmatched or self.conflicts:
            s.unmatched_labels, s.label_conflicts = len(self.unmatched), len(self.conflicts)
            write_label_report(out, self.unmatched, self.conflicts)
        s.seconds = time.perf_counter() - t_start
        s.pipeline_seconds = time.perf_counter() - self.t_pipeline
        return s

    def _metadata(self) -> dict:
        config, options = self.segmenter.config, self.options
        return {
            "command": "segment",
            "lungkit_version": __version__,
            **folder_entries("input_root", self.root, self.out),
            "model_name": config.name,
            "weights": self.segmenter.weights_path,
            "weights_sha256": self.segmenter.weights_sha256,
            "model_config": {k: getattr(config, k) for k in ("arch", "encoder", "in_channels", "input_size", "mean", "std")},
            "postprocess": self.post.as_dict(),
            "min_lung_fraction": options.min_lung_fraction,
            "qc": self.thresholds.as_dict(),
            "quality": _quality_metadata(self.segmenter.quality, options.tta),
            "settings_key": self.key,
            "device": str(self.device),
            "batch_size": options.batch_size,
            "labels": [str(p) for p in options.labels],
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }


def quality_thresholds(quality, options) -> QCThresholds:
    """QC thresholds: the user's where given, else those calibrated with the model (none if uncalibrated)."""
    max_ood = options.max_ood_score if options.max_ood_score is not None else (quality and quality.max_ood_score)
    min_est = options.min_est_dice if options.min_est_dice is not None else (quality and quality.min_est_dice)
    return QCThresholds(options.min_lung_fraction, max_ood, min_est)


def _quality_metadata(quality, tta: bool) -> dict:
    if quality is None:
        return {"calibrated": False}
    return {"calibrated": True, "tta": tta, "calibration": quality.report}

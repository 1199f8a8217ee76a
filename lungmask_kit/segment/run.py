"""The segment job: find the images, hold the output folder (`runfolder`), load the model once, run every image
through an engine (`engines.local` with the units of `segment.local`, or `engines.ray` with those of `segment.ray`),
and merge the manifest; `merge_shards` makes the one manifest of a sharded run."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from tqdm.auto import tqdm

from lungmask_kit import __version__, defaults
from lungmask_kit.choices import Engine
from lungmask_kit.decoder_warnings import WarningTally
from lungmask_kit.dicom_seg import (
    REFERENCED_UIDS,
    check_available,  # highdicom: optional
)
from lungmask_kit.discovery import Scan, output_names, scan_images, wants_dicom
from lungmask_kit.engines.local import ByteBudget, EngineSettings, run_local
from lungmask_kit.engines.ray import actor_device_type
from lungmask_kit.errors import LungkitError, NoImagesError
from lungmask_kit.fileio import inside, utc_stamp
from lungmask_kit.inference import Segmenter, oom_note
from lungmask_kit.labels import labels_update, match_labels, read_labels, write_label_report
from lungmask_kit.manifest import MANIFEST_NAME, SEGMENT_FIELDS, MissingRowsError, folder_entries, previous_table
from lungmask_kit.postprocess import PostprocessSettings
from lungmask_kit.qc import QCThresholds, qc_update
from lungmask_kit.runfolder import RunFolder, RunKind, RunSummary, Shard, keep_existing, running_holder, shard_records
from lungmask_kit.runtime import available_cores, prepare_device
from lungmask_kit.runtimes import choose_runtime, runtime_precision
from lungmask_kit.segment.local import LocalSteps
from lungmask_kit.segment.ray import RaySettings, run_ray
from lungmask_kit.segment.steps import (
    DICOM_SEG_DIR,
    HEART_DIR,
    OUTPUT_DIRS,
    DicomSegOutput,
    ImageReader,
    OutputWriter,
    Task,
    manifest_path,
    settings_key,
)


@dataclass
class SegmentOptions:
    weights: str | Path | None = None
    convention: str = defaults.CONVENTION  # which lung the masks outline (choices.Convention)
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 (runtime.autocast_dtype)
    runtime: str = "auto"  # auto | torch | openvino (runtimes.choose_runtime)
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
    flag_ctr_above: float | None = None  # QC: flag a cardiothoracic ratio above this (None: off)
    tta: bool = False  # a mirrored pass adds flip agreement to est_dice (masks are unchanged)
    dicom: bool = False  # also read extensionless / UID-named files as DICOM (.dcm is always read)
    max_decoded_mb: int = defaults.MAX_DECODED_MB  # decoded images held ahead of the model and writers
    gpu_decode: bool = True  # with CUDA, decode gray JPEGs with nvJPEG
    dicom_seg: bool = False  # also a DICOM Segmentation of each DICOM input, under OUT/dicom-seg/ (lungkit[dicom])
    heart_png: bool = False  # also the heart as PNG under OUT/heart/ (the manifest's heart_rle holds it either way)
    shard: str | None = None  # "K/N": only this part of the images; `merge_shards` makes the manifest
    engine: Engine = Engine.local  # local | ray (a string is taken too)
    ray_address: str | None = None  # None: a local Ray instance (or RAY_ADDRESS)
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        try:
            self.engine = Engine(self.engine)
        except ValueError:
            raise LungkitError(f"unknown engine {self.engine!r} (use {' or '.join(e.value for e in Engine)})") from None


def _discover(root: Path, out: Path, glob: str | None, dicom: bool = False) -> Scan:
    if root.is_file():
        raise LungkitError(f"{root} is a file: give the folder that holds the images (segment reads every image under it)")
    if not root.is_dir():
        raise LungkitError(f"input folder not found: {root}")
    if os.path.realpath(out) == os.path.realpath(root):
        raise LungkitError("the output folder must differ from the input folder")
    if inside(root, out):
        raise LungkitError(f"the input folder {root} lies inside the output folder {out}: choose an output folder outside it")
    scan = scan_images(root, glob, dicom)
    # never read our own outputs back as inputs when --out lies inside the input folder
    scan.images = [r for r in scan.images if not inside(root / r, out)]
    if not scan.images:
        ignored = f" (ignored {scan.ignored_text()}: not image types lungkit reads)" if scan.ignored else ""
        raise NoImagesError(f"no images found under {root}" + (f" matching {glob!r}" if glob else "") + ignored)
    return scan


def _check_options(options: SegmentOptions) -> Shard | None:
    if options.dicom_seg:

        check_available()
    if options.shard is None:
        return None
    shard = Shard.parse(options.shard)
    if options.overwrite:
        raise LungkitError("--overwrite cannot be combined with --shard: run the shards into a new or emptied folder")
    return shard


def run_segment(input_dir: str | Path, out: str | Path, options: SegmentOptions) -> RunSummary:
    """`lungkit segment`: masks, variants and a manifest for every image under `input_dir`.

    Args:
        input_dir: the folder searched recursively for images.
        out: the output folder (masks/, lungs/, nolungs/, manifest.parquet); a re-run resumes.
        options: model, precision, post-processing, QC, performance and sharding settings; with
            `options.shard`, only this shard's part of the images, leaving the manifest to `merge_shards`.

    Returns:
        The run's summary (counts, errors, warnings, the manifest's path).
    """
    t_start = time.perf_counter()
    shard = _check_options(options)
    root, out = Path(input_dir), Path(out)
    scan = _discover(root, out, options.glob, options.dicom)
    rels = scan.images
    kind = RunKind("segment", os.path.realpath(root))
    with RunFolder(out, kind, SEGMENT_FIELDS, options.overwrite, shard, MANIFEST_NAME) as folder, WarningTally() as tally:
        run = _SegmentRun(root, folder, rels, options)
        run.execute()
        summary = run.finish(t_start)
    if tally.summary():
        summary.warnings.append(tally.summary())
    _say_what_was_not_read(summary, scan, root, out)
    if options.dicom_seg:
        summary.warnings.append(_dicom_seg_sentence(out, options.dicom))
    return summary


def _dicom_seg_sentence(out: Path, dicom: bool) -> str:
    """How many DICOM SEGs the manifest names, and why ok images have none: not DICOM, or a DICOM lacking a UID a
    SEG must reference."""
    table = pq.read_table(out / MANIFEST_NAME, columns=["path", "status", "dicom_seg_path"]).to_pylist()
    ok = [r for r in table if r["status"] == "ok"]
    written = sum(bool(r["dicom_seg_path"]) for r in ok)
    not_dicom = sum(not wants_dicom(r["path"], dicom) for r in ok)
    lacking = len(ok) - written - not_dicom
    text = f"--dicom-seg: {written} DICOM Segmentation(s) in {out / DICOM_SEG_DIR}"
    if lacking:
        text += (f"; {lacking} DICOM input(s) lack a UID a SEG must reference ({', '.join(REFERENCED_UIDS)}) and have "
                 "none")
    return text + (f"; {not_dicom} input(s) are not DICOM and have none" if not_dicom else "")


def _say_what_was_not_read(summary: RunSummary, scan: Scan, root: Path, out: Path) -> None:
    """The summary's ignored files, and one warning for lungkit output folders found in the input (this run's own
    --out inside the input folder is expected and not mentioned)."""
    summary.ignored = scan.ignored_text()
    others = [f for f in scan.output_folders if os.path.realpath(root / f) != os.path.realpath(out)]
    if others:
        summary.warnings.append(f"not read: {len(others)} lungkit output folder(s) inside the input folder "
                                f"(e.g. {others[0]}); lungkit's outputs are never taken as input")


class _SegmentRun:
    """One run into a locked RunFolder: the model and settings, the engine, and the manifest (or shard record)."""

    def __init__(self, root: Path, folder: RunFolder, rels: list[str], options: SegmentOptions):
        self.root, self.folder, self.out, self.options = root, folder, folder.out, options
        self.paths = [manifest_path(r) for r in rels]
        self.labels = _Labels(options.labels, self.paths)  # read now: a bad label file fails before the images
        if not options.overwrite:
            _refuse_mixed_conventions(folder, root, self.paths, options.convention)
        if options.engine is Engine.ray:  # the model runs in Ray's actors; the driver's copy gives config and quality
            model_device, self.device = actor_device_type(options.ray_address, options.device), prepare_device("cpu")
        else:
            self.device = prepare_device(options.device)
            model_device = self.device.type
        gpu_jpeg = self.device.type == "cuda" and options.gpu_decode and options.engine is Engine.local
        # the runtime and precision the model runs at where it runs (Ray's actors may be on GPUs the driver lacks;
        # the driver's copy only gives config and quality, so it runs torch)
        self.runtime = choose_runtime(options.runtime, model_device, options.precision)
        self.model_runs_on = "GPU" if model_device == "cuda" else "CPU"  # for the summary
        self.segmenter = Segmenter(options.weights, self.device, options.convention, options.precision,
                                   decode_jpeg_on_device=gpu_jpeg,
                                   runtime="torch" if options.engine is Engine.ray else self.runtime)
        self.precision = runtime_precision(self.runtime, options.precision, model_device)
        folder.start()  # the weights loaded: from here on the folder holds this run
        self.post = PostprocessSettings(
            threshold=self.segmenter.config.threshold if options.threshold is None else options.threshold,
            min_object_fraction=options.min_object_fraction,
            max_hole_fraction=options.max_hole_fraction,
            keep_largest=options.keep_largest,
        )
        self.key = settings_key(self.segmenter.weights_sha256, self.segmenter.config, self.post, options.tta,
                                options.batch_size, model_device, self.segmenter.decodes_jpeg_on_device,
                                options.convention, self.precision, options.dicom_seg, options.heart_png, self.runtime)
        self.thresholds = quality_thresholds(self.segmenter.quality, options)
        done = folder.done(self.key, ("sha256",))
        names = output_names(rels)
        self.tasks = [Task(r, names[r], (done.get(p) or (None,))[0]) for r, p in zip(rels, self.paths)
                      if folder.shard is None or folder.shard.owns(p)]
        self.summary = RunSummary(found=len(self.tasks))
        # every model batch has the same size, however the run was interrupted or sharded, so masks are
        # byte-identical; a folder smaller than one batch is not padded beyond its own size
        self.pad_to = min(options.batch_size, len(self.paths))

    def execute(self) -> None:
        self.t_pipeline = time.perf_counter()
        bar = tqdm(total=len(self.tasks), unit="img", disable=not self.options.progress, dynamic_ncols=True, smoothing=0.1)
        try:
            if self.options.engine is Engine.ray:
                o = self.options
                settings = RaySettings(o.ray_address, o.device, o.batch_size, o.tta, o.weights and os.path.abspath(o.weights),
                                       o.convention, o.precision, self.runtime)
                run_ray(self.reader(on_host=True), self.writer(), self.segmenter.weights_sha256, self.tasks, settings,
                        self.pad_to, self.record, bar)
            else:
                self._run_local(bar)
        finally:
            bar.close()

    def reader(self, on_host: bool = False) -> ImageReader:
        """`on_host`: decode and prepare everything on the host, with absolute paths (for engines that ship
        the units to other processes and machines)."""
        seg = self.segmenter
        root, out = (self.root.absolute(), self.out.absolute()) if on_host else (self.root, self.out)
        return ImageReader(root, out, self.key, seg.config, self.options.dicom,
                           prepare_on_host=on_host or not seg.prepares_on_device,
                           jpeg_on_device=not on_host and seg.decodes_jpeg_on_device,
                           heart="heart" in seg.extra_outputs and self.options.heart_png)

    def writer(self) -> OutputWriter:
        seg = self.segmenter
        dicom_seg = DicomSegOutput(self.root.absolute(), seg.config.name, seg.weights_sha256[:12], self.options.dicom) \
            if self.options.dicom_seg else None
        return OutputWriter(self.out.absolute(), self.post, seg.quality, self.options.convention, dicom_seg,
                            self.options.heart_png)

    def _run_local(self, bar) -> None:
        o = self.options
        settings = EngineSettings(o.batch_size, o.workers or available_cores(), o.max_decoded_mb << 20)
        budget = ByteBudget(settings.max_decoded_bytes)
        steps = LocalSteps(self.reader(), self.writer(), self.segmenter, budget, self.pad_to, o.tta)
        run_local(steps, self.tasks, settings, self.record, budget, bar)

    def record(self, rows: list[dict]) -> None:
        """A finished batch's rows become a manifest part (skipped images keep their earlier row)."""
        s = self.summary
        kept = []
        for row in rows:
            if row["status"] == "skipped":
                s.skipped += 1
                continue
            if row["status"] == "error":
                s.errors.append((row["path"], row.get("error") or ""))
            kept.append(row)
        s.processed += len(kept)
        self.folder.parts.write(kept)

    def finish(self, t_start: float) -> RunSummary:
        s = self.summary
        s.uncalibrated = self.segmenter.quality is None
        s.model = (f"{self.segmenter.config.name} ({self.options.convention} lungs), {self.model_runs_on}: "
                   f"{self.runtime} {self.precision}")
        note = oom_note(self.segmenter)
        if note:
            s.warnings.append(note)
        if self.folder.shard is None:
            _finish_manifest(self.folder, self.root, self.paths, self.labels, self.thresholds, self._metadata(), s)
        else:
            self.folder.write_shard_record({
                "input_root": os.path.relpath(self.root.resolve(), self.out.resolve()),
                "glob": self.options.glob, "dicom": self.options.dicom,
                "labels": [os.path.abspath(p) for p in self.options.labels],
                "thresholds": self.thresholds.as_dict(), "metadata": self._metadata(),
            })
            s.ok = s.processed - len(s.errors)
            s.failed = len(s.errors)
            s.next_step = (f"shard {self.folder.shard} done; when all {self.folder.shard.count} shards have finished, "
                           f"`lungkit merge {self.out}` writes the manifest")
            s.output_folders = _output_folders(self.out)
        s.warnings[:0] = self.folder.warnings
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
            "convention": options.convention,
            "weights": self.segmenter.weights_path,
            "weights_sha256": self.segmenter.weights_sha256,
            "model_config": {k: getattr(config, k) for k in ("arch", "encoder", "in_channels", "input_size", "mean", "std")},
            "postprocess": self.post.as_dict(),
            "min_lung_fraction": options.min_lung_fraction,
            "qc": self.thresholds.as_dict(),
            "quality": _quality_metadata(self.segmenter.quality, options.tta),
            "settings_key": self.key,
            "device": str(self.device),
            "precision": self.precision,
            "backend": self.runtime,
            "engine": options.engine,
            "batch_size": options.batch_size,
            "labels": [str(p) for p in options.labels],
            "finished_at": utc_stamp(),
        }


def _refuse_mixed_conventions(folder: RunFolder, root: Path, paths: list[str], convention: str) -> None:
    """A run in one convention into a folder whose manifest keeps rows of images outside this run (another
    --glob) drawn in the other would leave a manifest of two conventions under metadata that names one. (Damaged
    manifest files found here are set aside and said in the run's warnings, as the resume map would.)"""
    out = folder.out
    previous = previous_table(out, MANIFEST_NAME, SEGMENT_FIELDS, folder.warnings)
    if previous is None or "convention" not in previous.column_names:
        return
    ours, keep = set(paths), keep_existing(root, overwrite=False)
    rows = previous.select(["path", "convention"]).to_pylist()
    other = next((r for r in rows if r["convention"] not in (None, convention) and r["path"] not in ours
                  and keep(r["path"])), None)
    if other is not None:
        raise LungkitError(f"{out} holds {other['convention']} masks of images this run leaves alone (e.g. "
                           f"{other['path']}): a {convention} run would mix both conventions in one manifest; run "
                           "over all of them (no --glob), pass --overwrite, or choose another -o")


class _Labels:
    """The label files matched to the run's images (read once; reset on the manifest only when given)."""

    def __init__(self, files: list, paths: list[str]):
        self.given = bool(files)
        rows = read_labels(files) if files else []
        self.matched, self.unmatched, self.conflicts = match_labels(paths, rows)


def _finish_manifest(folder: RunFolder, root: Path, paths: list[str], labels: _Labels, thresholds: QCThresholds,
                     metadata: dict, s: RunSummary) -> None:
    """The merged manifest: the rows of `paths`, earlier rows of images outside this --glob, QC and labels; rows
    whose input left the input folder (all earlier rows of other images, with --overwrite) are dropped with their
    outputs. Shared by a plain run and `merge_shards`."""
    out = folder.out

    def update(table):  # labels are (re)set only when label files were given: a plain re-run keeps them
        table = labels_update(labels.matched)(table) if labels.given else table
        return qc_update(thresholds)(table)

    table, s.removed_stale = folder.finalize(paths, metadata, update=update, keep_other=keep_existing(root, folder.overwrite))
    s.count(table)
    s.manifest = str(out / MANIFEST_NAME)
    s.output_folders = _output_folders(out)
    if labels.unmatched or labels.conflicts:
        s.unmatched_labels, s.label_conflicts = len(labels.unmatched), len(labels.conflicts)
        write_label_report(out, labels.unmatched, labels.conflicts)


def _output_folders(out: Path) -> list[str]:
    """Where a run's images went: masks, lungs, nolungs, and heart where the model draws one."""
    return [str(out / d) for d in OUTPUT_DIRS.values()] + ([str(out / HEART_DIR)] if (out / HEART_DIR).is_dir() else [])


def merge_shards(out: str | Path) -> RunSummary:
    """`lungkit merge`: the one manifest of a sharded run, from the parts its shards wrote into OUT. Refused
    while a shard still runs, and while an image of the input folder has no row yet (its shard did not finish)."""
    t_start = time.perf_counter()
    out = Path(out)
    record = _shard_record(out)
    root = (out / record["input_root"]).resolve()
    rels = _discover(root, out, record["glob"], record["dicom"]).images
    paths = [manifest_path(r) for r in rels]
    kind = RunKind("segment", os.path.realpath(root))
    count = Shard.parse(record["shard"]).count
    with RunFolder(out, kind, SEGMENT_FIELDS, manifest_name=MANIFEST_NAME) as folder:
        s = RunSummary(found=len(paths))
        labels = _Labels(record["labels"], paths)
        metadata = {**record["metadata"], "shards": count, "finished_at": utc_stamp()}
        try:
            _finish_manifest(folder, root, paths, labels, QCThresholds(**record["thresholds"]), metadata, s)
        except MissingRowsError as err:
            raise _unfinished_shards(err.paths, count) from None
        s.warnings[:0] = folder.warnings
    s.seconds = s.pipeline_seconds = time.perf_counter() - t_start
    return s


def _shard_record(out: Path) -> dict:
    if not (out / MANIFEST_NAME).exists() and not out.is_dir():
        raise LungkitError(f"output folder not found: {out}")
    records = shard_records(out)
    running = running_holder(out)
    if not records and running:
        raise LungkitError(f"{out} holds no finished shard yet, and shards are still running ({running}): "
                           "merge when they have finished")
    if not records:
        raise LungkitError(f"{out} holds no finished shard to merge (run `lungkit segment DIR -o {out} --shard K/N` first)")
    first = records[0]
    for r in records[1:]:
        same = all(r.get(k) == first.get(k) for k in ("input_root", "glob", "dicom")) and \
            r["metadata"]["settings_key"] == first["metadata"]["settings_key"] and \
            Shard.parse(r["shard"]).count == Shard.parse(first["shard"]).count
        if not same:
            raise LungkitError(f"the shards in {out} were run with different inputs or settings "
                               f"(shards {first['shard']} and {r['shard']}); re-run them alike")
    return first


def _unfinished_shards(missing: list[str], count: int) -> LungkitError:
    shards = sorted({k for p in missing for k in range(1, count + 1) if Shard(k, count).owns(p)})
    return LungkitError(f"{len(missing)} image(s) have no row yet, e.g. {missing[0]}: shard(s) "
                        f"{', '.join(f'{k}/{count}' for k in shards)} did not finish; run them again (they resume), "
                        "then merge")


def quality_thresholds(quality, options) -> QCThresholds:
    """QC thresholds: the user's where given, else those calibrated with the model (none if uncalibrated)."""
    max_ood = options.max_ood_score if options.max_ood_score is not None else (quality and quality.max_ood_score)
    min_est = options.min_est_dice if options.min_est_dice is not None else (quality and quality.min_est_dice)
    return QCThresholds(options.min_lung_fraction, max_ood, min_est, options.flag_ctr_above)


def _quality_metadata(quality, tta: bool) -> dict:
    if quality is None:
        return {"calibrated": False}
    return {"calibrated": True, "tta": tta, "image_gate": quality.gate, "calibration": quality.report}

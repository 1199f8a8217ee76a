"""`lungkit variants`: lungs-only / lungs-removed images from existing masks, without a model: the job.

The pairs come from one of four sources (`sources`); each goes through `pair.process` in joblib workers; each
finished chunk becomes a manifest part, so runs resume like `segment`. The derive step is
`derive.derive_variants` and the lungs' finishing `anatomy.lungs`, the same ones `segment` uses.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from lungmask_kit import __version__, defaults
from lungmask_kit.decoder_warnings import WarningTally
from lungmask_kit.derive import VARIANTS
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import digest, utc_stamp
from lungmask_kit.manifest import MANIFEST_NAME, carry_columns, folder_entries, read_metadata
from lungmask_kit.qc import QCThresholds, qc_update
from lungmask_kit.runfolder import RunFolder, RunKind, RunSummary, keep_existing
from lungmask_kit.runtime import available_cores
from lungmask_kit.variants.options import FIELDS, OUTPUT_FORMAT, VariantsOptions
from lungmask_kit.variants.pair import ShapeGate, process, shape_gate
from lungmask_kit.variants.sources import PairTask, find_pairs

_CHUNK = 64  # rows per manifest part



def _settings_key(options: VariantsOptions, gate: ShapeGate | None) -> str:
    payload = {"crop": options.crop, "margin": options.margin if options.crop else 0, "only": sorted(options.only),
               "resize_masks": options.resize_masks, "format": OUTPUT_FORMAT, "shape_gate": gate and gate.digest}
    return digest(payload)



def _process_all(folder: RunFolder, options: VariantsOptions, tasks: list[PairTask], key: str, done: dict,
                 gate, summary: RunSummary, tally) -> None:
    """Every pair through `_process` in joblib workers; each chunk of rows becomes a manifest part."""
    from joblib import Parallel, delayed

    out, jobs, buffer = str(folder.out), options.jobs or available_cores(), []
    results = Parallel(n_jobs=jobs, return_as="generator", batch_size=4)(
        delayed(process)(t, out, options, key, done.get(t.rel), gate) for t in tasks
    ) if jobs > 1 else (process(t, out, options, key, done.get(t.rel), gate) for t in tasks)
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
    found = find_pairs(out, options, manifest, images, masks)
    kind = RunKind("variants", os.path.realpath(found.images_root))
    # --in-place asked to replace the input manifest, which is another command's run by design
    with RunFolder(out, kind, FIELDS, options.overwrite or options.in_place, manifest_name=MANIFEST_NAME) as folder:
        summary = _run_locked(folder, options, found.tasks, found.images_root, found.masks_root, found.manifest, t0,
                              found.carried)
    if found.note:
        summary.warnings.insert(0, found.note)
    return summary


def _convention_of(tasks: list[PairTask]) -> str:
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


def _run_locked(folder: RunFolder, options: VariantsOptions, tasks: list[PairTask], images_root: Path, masks_root: Path,
                manifest: Path | None, t0: float, carried=None) -> RunSummary:
    out = folder.out
    summary = RunSummary(found=len(tasks))
    tally = WarningTally()
    gate = shape_gate(options.weights, _convention_of(tasks))
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

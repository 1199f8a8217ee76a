"""`lungkit segment`: lung masks, lungs-only and lungs-removed images and a manifest for a folder of CXRs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit import defaults
from lungmask_kit.choices import Convention, Engine, Precision, Runtime
from lungmask_kit.errors import LungkitError
from lungmask_kit.cli._options import (
    BatchSizeOpt,
    ConventionOpt,
    DeviceOpt,
    DicomOpt,
    LabelsOpt,
    MaxOodScoreOpt,
    MinLungFractionOpt,
    OutOpt,
    OverwriteOpt,
    PrecisionOpt,
    RuntimeOpt,
    QuietOpt,
    ReportOpt,
    WeightsOpt,
)
from lungmask_kit.cli._output import finish_run


def segment(
    input_dir: Annotated[Path, typer.Argument(help="Folder searched recursively for png/jpg/jpeg/bmp/tif/tiff and DICOM (.dcm) images.", metavar="DIR")],
    out: OutOpt,
    weights: WeightsOpt = None,
    convention: ConventionOpt = Convention.v7,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = Precision.auto,
    runtime: RuntimeOpt = Runtime.auto,
    batch_size: BatchSizeOpt = defaults.BATCH_SIZE,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="Decode threads and writer threads, each (0 = one per core).")] = 0,
    glob: Annotated[str | None, typer.Option("--glob", help="Only relative paths (or file names) matching this pattern, e.g. 'train/*.png'.")] = None,
    labels: LabelsOpt = None,
    min_lung_fraction: MinLungFractionOpt = defaults.MIN_LUNG_FRACTION,
    threshold: Annotated[float | None, typer.Option("--threshold", min=0.0, max=1.0, help="Lung probability cut-off (default: the model's, 0.5).")] = None,
    min_object_fraction: Annotated[float, typer.Option("--min-object-fraction", min=0.0, max=1.0, help="Remove components under this fraction of the image.")] = defaults.MIN_OBJECT_FRACTION,
    max_hole_fraction: Annotated[float, typer.Option("--max-hole-fraction", min=0.0, max=1.0, help="Fill holes under this fraction of the image.")] = defaults.MAX_HOLE_FRACTION,
    keep_largest: Annotated[int, typer.Option("--keep-largest", min=0, help="Keep the N largest components (2 = both lungs; 0 = all).")] = defaults.KEEP_LARGEST,
    max_ood_score: MaxOodScoreOpt = None,
    min_est_dice: Annotated[float | None, typer.Option("--min-est-dice", min=0.0, max=1.0, help="QC: flag masks whose estimated Dice is under this (default: the model's calibrated value). Re-flags without re-segmenting.")] = None,
    flag_ctr_above: Annotated[float | None, typer.Option("--flag-ctr-above", min=0.0, max=2.0, help="QC: flag images whose cardiothoracic ratio is above this, e.g. 0.5 for a cardiomegaly subset (off by default; a model with a heart output). Re-flags without re-segmenting.")] = None,
    max_decoded_mb: Annotated[int, typer.Option("--max-decoded-mb", min=16, help="Memory for decoded images waiting for the model and the writers, in MiB (bounds memory by bytes, whatever --workers and --batch-size are).")] = defaults.MAX_DECODED_MB,
    tta: Annotated[bool, typer.Option("--tta", help="Also run each image mirrored: flip agreement sharpens est_dice (masks unchanged; about 2x model time).")] = False,
    dicom: DicomOpt = False,
    dicom_seg: Annotated[bool, typer.Option("--dicom-seg", help="Also write a DICOM Segmentation (right and left lung segments) of each DICOM input under OUT/dicom-seg/: same Study, new Series, referencing the source image (pip install 'lungkit\\[dicom]').")] = False,
    heart_png: Annotated[bool, typer.Option("--heart-png", help="Also write each heart mask as PNG under OUT/heart/ (the manifest's heart_rle holds it either way; a model with a heart output).")] = False,
    shard: Annotated[str | None, typer.Option("--shard", metavar="K/N", help="Only part K of N of the images (by a hash of each path), for N processes or Slurm array tasks writing into one OUT on a shared filesystem; `lungkit merge OUT` then writes the manifest.")] = None,
    engine: Annotated[Engine, typer.Option("--engine", help="local (threads in this process) | ray (Ray Data across a cluster; pip install 'lungkit\\[ray]').")] = Engine.local,
    ray_address: Annotated[str | None, typer.Option("--ray-address", help="With --engine ray: the cluster to join (e.g. ray://head:10001 or auto) (default: RAY_ADDRESS, else a local Ray).")] = None,
    gpu_decode: Annotated[bool, typer.Option("--gpu-decode/--no-gpu-decode", help="With CUDA, decode grayscale JPEGs on the GPU with nvJPEG (pixels can differ from libjpeg's by a grey level; --no-gpu-decode keeps them identical to a CPU run).")] = True,
    overwrite: OverwriteOpt = False,
    report: ReportOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Segment every image under DIR into OUT/masks, OUT/lungs, OUT/nolungs and OUT/manifest.parquet.

    Re-running the same command resumes: images already done with the same content and settings are skipped.

    Exit status: 0 every image ok (QC-flagged images included); 1 some images failed (see the manifest);
    2 bad arguments or unusable input/output folder; 3 no images found; 4 unusable weights.

    Examples:

      lungkit segment examples/cxr-sample/images -o out/sample

      # visible lung fields, as CheXmask draws them
      lungkit segment montgomery/ -o out/mc --convention jsrt

      lungkit segment covidx/ -o out/covidx --labels covidx/train.txt --labels \\
          covidx/test.txt --batch-size 32

      lungkit segment mimic/ -o /shared/out \\
          --shard $((SLURM_ARRAY_TASK_ID + 1))/$SLURM_ARRAY_TASK_COUNT
    """
    from lungmask_kit.runtime import cpu_load_warning, passive_openmp_threads

    passive_openmp_threads()  # before the job imports torch
    from lungmask_kit.segment import SegmentOptions, run_segment

    if not quiet and (warning := cpu_load_warning()):
        typer.echo(f"lungkit: warning: {warning}", err=True)
    options = SegmentOptions(
        weights=weights, convention=convention.value, device=device, precision=precision.value,
        runtime=runtime.value, batch_size=batch_size, workers=workers, glob=glob,
        labels=list(labels or []), min_lung_fraction=min_lung_fraction, threshold=threshold,
        min_object_fraction=min_object_fraction, max_hole_fraction=max_hole_fraction,
        keep_largest=keep_largest, max_ood_score=max_ood_score, min_est_dice=min_est_dice, flag_ctr_above=flag_ctr_above, tta=tta,
        max_decoded_mb=max_decoded_mb, dicom=dicom, dicom_seg=dicom_seg, heart_png=heart_png, gpu_decode=gpu_decode, shard=shard, engine=engine.value,
        ray_address=ray_address, overwrite=overwrite, progress=not quiet,
    )
    if report and shard:
        raise LungkitError("--report needs the whole run: pass it to `lungkit merge` once every shard has finished")
    s = run_segment(input_dir, out, options)
    finish_run(s, quiet, "lungkit segment summary", out, report)


def register(app: typer.Typer) -> None:
    app.command("segment")(segment)

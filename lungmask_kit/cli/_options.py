"""Option aliases shared by every command, so flags read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit.choices import Convention, Precision

OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created if missing).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto | cpu | cuda | cuda:N.")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per model batch.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary table; errors still go to stderr.")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Random seed (splits, shuffling, augmentation).")]
EpochsOpt = Annotated[int, typer.Option("--epochs", min=1, help="Training epochs.")]
LrOpt = Annotated[float, typer.Option("--lr", min=0.0, help="Peak learning rate (AdamW, warmup then cosine).")]
WeightsOpt = Annotated[
    Path | None,
    typer.Option("--weights", "-w", help="A .safetensors file (config JSON beside it) or a folder; default: the bundled model."),
]
MinLungFractionOpt = Annotated[
    float,
    typer.Option(
        "--min-lung-fraction",
        min=0.0,
        max=1.0,
        help="QC: flag images whose lung area is under this fraction of the image (the study's code used 1/15).",
    ),
]
MaxOodScoreOpt = Annotated[
    float | None,
    typer.Option(
        "--max-ood-score",
        min=0.0,
        help="QC: flag images whose input-gate score is above this (1.0 = the gate calibrated with the model; "
        "higher is more lenient). Re-running with another value re-flags without re-segmenting.",
    ),
]
InputRootOpt = Annotated[
    Path | None,
    typer.Option("--input-root", help="Where the manifest's original images are now, if they moved "
                 "[default: the folder it recorded, relative to the manifest, then absolute]."),
]
ConventionOpt = Annotated[
    Convention,
    typer.Option("--convention", help="Which lung the masks outline: v7 = the whole lung, behind the heart included "
                 "(V7 Labs); jsrt = the visible lung fields only (JSRT/SCR, Montgomery, Shenzhen, CheXmask)."),
]
PrecisionOpt = Annotated[
    Precision,
    typer.Option("--precision", help="auto: fp16 autocast on CUDA, bf16 on a CPU with bf16 units (AVX512-BF16 or "
                 "AMX; masks agree with fp32 at Dice 0.9997 mean), fp32 elsewhere. The precision is a resume setting."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Redo every image instead of resuming.")]
LabelsOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--labels",
        help="Label file(s): COVIDx txt (patient_id filename label source) or CSV with a path/filename column. "
        "Repeat for several; a COVIDx train.txt/test.txt name sets the split.",
    ),
]
DicomOpt = Annotated[
    bool,
    typer.Option("--dicom", help="Also read files without an extension (or named by a UID, 1.2.840...) as DICOM; "
                 ".dcm/.dicom files are always read."),
]
ReportOpt = Annotated[
    bool,
    typer.Option("--report", help="Also write the QC page OUT/report/index.html at the end (as `lungkit report OUT`)."),
]

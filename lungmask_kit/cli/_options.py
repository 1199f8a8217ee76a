"""Option aliases shared by every command, so flags read the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit.choices import Convention, Precision, Runtime

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
                 "(default: the folder it recorded, relative to the manifest, then absolute)."),
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
RuntimeOpt = Annotated[
    Runtime,
    typer.Option("--runtime", help="What runs the network. auto: torch on a GPU and on a CPU with bf16 units; "
                 "OpenVINO f32 on other CPUs (faster than torch fp32, same masks). The runtime is a resume setting."),
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


# Help panels, by parameter name (the same name means the same thing in every command); what is not listed
# stays in the first panel, "Options".
HELP_PANELS = {
    "Input and output": ("out", "glob", "dicom", "labels", "labels_from_folders", "input_root", "overwrite", "in_place",
                         "images", "masks", "truth", "name", "license", "masks_only", "shard_mb", "keep_identifiers",
                         "only", "crop", "margin", "resize_masks", "report", "patient_from", "chexmask", "chexmask_id"),
    "Model": ("weights", "convention", "threshold", "min_object_fraction", "max_hole_fraction", "keep_largest", "tta",
              "arch", "init", "pretrained", "encoder", "encoder_weights", "in_channels", "size", "checkpoint",
              "eval_only", "normalize", "channels"),
    "Quality control": ("min_lung_fraction", "max_ood_score", "min_est_dice", "include_flagged", "sample", "lowest",
                        "per_page", "min_rca"),
    "Performance": ("device", "runtime", "precision", "batch_size", "workers", "jobs", "max_decoded_mb", "gpu_decode", "cache"),
    "Cluster": ("shard", "engine", "ray_address"),
}
_PANEL_OF = {name: panel for panel, names in HELP_PANELS.items() for name in names}


def arrange_help(app: typer.Typer) -> None:
    """Every command's options into HELP_PANELS, and no `<bool>` metavar on a flag: done once, on the option
    declarations themselves, so each command module keeps only its arguments."""
    import typing

    from typer.models import ArgumentInfo, OptionInfo

    for command in app.registered_commands:
        hints = typing.get_type_hints(command.callback, include_extras=True)
        for name, hint in hints.items():
            info = next((m for m in getattr(hint, "__metadata__", ()) if isinstance(m, (OptionInfo, ArgumentInfo))), None)
            if info is None:
                continue
            kind = typing.get_args(hint)[0]
            if isinstance(info, OptionInfo) and info.rich_help_panel is None and name in _PANEL_OF:
                info.rich_help_panel = _PANEL_OF[name]
            if info.metavar is None:
                info.metavar = "" if kind is bool else _list_metavar(kind, name, isinstance(info, ArgumentInfo))
        # the annotations are strings (postponed evaluation): keep the evaluated ones, so Typer reads these objects
        command.callback.__annotations__ = hints


def _list_metavar(kind, name: str, argument: bool) -> str | None:
    """A repeatable option's or argument's metavar: what one value is (`PATH`, `v7|jsrt`), not `<list[Path]>`."""
    import enum
    import typing

    args = [a for a in typing.get_args(kind) if a is not type(None)]
    inner = typing.get_args(args[0]) if args and typing.get_origin(args[0]) is list else typing.get_args(kind) if typing.get_origin(kind) is list else ()
    if not inner:
        return None
    if argument:
        return name.upper()
    element = inner[0]
    if isinstance(element, type) and issubclass(element, enum.Enum):
        return "|".join(e.value for e in element)
    return "PATH" if element is Path else "TEXT"

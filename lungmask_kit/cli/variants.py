"""`lungkit variants`: lungs-only and lungs-removed images from existing masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit import defaults
from lungmask_kit.cli._options import DicomOpt, InputRootOpt, MaxOodScoreOpt, MinLungFractionOpt, OutOpt, OverwriteOpt, QuietOpt, ReportOpt, WeightsOpt
from lungmask_kit.cli._output import finish_run
from lungmask_kit.choices import Convention


def variants(
    out: OutOpt,
    manifest: Annotated[Path | None, typer.Argument(help="A segment manifest.parquet, or a dataset made by `lungkit publish --masks-only` (with --input-root); or use --images and --masks.")] = None,
    images: Annotated[Path | None, typer.Option("--images", help="Folder of images.")] = None,
    masks: Annotated[Path | None, typer.Option("--masks", help="Folder of masks matched to images by relative path / stem (COVID-QU-Ex 'lung masks' folders work as they are).")] = None,
    crop: Annotated[bool, typer.Option("--crop", help="Crop outputs to the lungs' bounding box.")] = False,
    margin: Annotated[int, typer.Option("--margin", min=0, help="Pixels added around the crop box.")] = 0,
    only: Annotated[list[str] | None, typer.Option("--only", help="Variant(s) to write: lungs, nolungs (repeat or comma-separate).")] = None,
    convention: Annotated[Convention | None, typer.Option("--convention", help="With --masks: what your masks outline (v7 = whole lung, behind the heart included; jsrt = visible lung fields), recorded in the manifest and used to score their shape; default: not known (a manifest's own convention is carried).")] = None,
    chexmask: Annotated[Path | None, typer.Option("--chexmask", metavar="CSV", help="Masks from a CheXmask CSV (Right Lung + Left Lung) for the images under --images, matched by the id column; resized (nearest) where CheXmask's size differs, said in mask_source.")] = None,
    chexmask_id: Annotated[str | None, typer.Option("--chexmask-id", metavar="COLUMN", help="The CSV's image id column (default: the first of dicom_id, Path, Image Index, ImageID, image_id).")] = None,
    min_rca: Annotated[float | None, typer.Option("--min-rca", min=0.0, max=1.0, help="With --chexmask: drop rows whose Dice RCA (Mean) is under this (CheXmask advises 0.7); the value is kept in mask_quality.")] = None,
    resize_masks: Annotated[bool, typer.Option("--resize-masks", help="Resize masks of another size than their image (nearest neighbour) instead of failing the row.")] = False,
    min_lung_fraction: MinLungFractionOpt = defaults.MIN_LUNG_FRACTION,
    max_ood_score: MaxOodScoreOpt = None,
    weights: WeightsOpt = None,
    input_root: InputRootOpt = None,
    dicom: DicomOpt = False,
    jobs: Annotated[int, typer.Option("--jobs", "-j", min=0, help="Worker processes (0 = every core).")] = 0,
    glob: Annotated[str | None, typer.Option("--glob", help="Only image paths matching this pattern.")] = None,
    in_place: Annotated[bool, typer.Option("--in-place", help="Allow --out to be the folder of the input manifest (replaces it).")] = False,
    overwrite: OverwriteOpt = False,
    report: ReportOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write OUT/lungs (image AND mask), OUT/nolungs (image AND NOT mask) and OUT/manifest.parquet.

    Masks are binarised by one rule: 0/1 and 0/255 masks as they are; anti-aliased masks at half their
    range; two-level or colour-mapped masks against the background value found on the border.

    QC: lung area, and the mask-shape part of the input gate (two lungs side by side, extent, solidity) scored
    with the statistics of --weights (default: the bundled model). ood_score and est_dice need the model's
    forward pass and stay null here.

    Examples:

      lungkit variants out/sample/manifest.parquet -o out/variants --crop \\
          --margin 16

      lungkit variants --images COVID-QU-Ex/Train/COVID-19/images --masks \\
          "COVID-QU-Ex/Train/COVID-19/lung masks" -o out/qu

      lungkit variants --chexmask CheXmask/OriginalResolution/ChestX-Ray8.csv \\
          --images chestxray8/images -o out/cx8 --min-rca 0.7
    """
    from lungmask_kit.variants import VariantsOptions, run_variants

    chosen = tuple(v.strip() for item in (only or ["lungs,nolungs"]) for v in item.split(",") if v.strip())
    options = VariantsOptions(crop=crop, margin=margin, min_lung_fraction=min_lung_fraction, only=chosen,
                              resize_masks=resize_masks, jobs=jobs, glob=glob, overwrite=overwrite,
                              in_place=in_place, progress=not quiet, weights=weights, max_ood_score=max_ood_score,
                              input_root=input_root, dicom=dicom, convention=convention and convention.value,
                              chexmask=chexmask, chexmask_id=chexmask_id, min_rca=min_rca)
    s = run_variants(out, options, manifest=manifest, images=images, masks=masks)
    finish_run(s, quiet, "lungkit variants summary", out, report)


def register(app: typer.Typer) -> None:
    app.command("variants")(variants)

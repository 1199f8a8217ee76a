"""`lungkit calibrate`: refit a segmenter's input gate and est_dice on annotated data, without retraining."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit import defaults
from lungmask_kit.cli._options import DeviceOpt, QuietOpt, SeedOpt, WeightsOpt
from lungmask_kit.cli._output import table
from lungmask_kit.choices import Convention


def calibrate(
    data: Annotated[list[Path], typer.Argument(help="images/ + masks/ folder, COVID-QU-Ex root, or CSV (image,mask\\[,patient_id,split,convention]); one per convention for a model with several.")],
    weights: WeightsOpt = None,
    convention: Annotated[list[Convention] | None, typer.Option("--convention", help="What the masks of DATA outline: once for all DATA, or once per DATA in order. Default: v7.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write a calibrated copy of the model here instead of updating it in place.")] = None,
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.01, max=0.9, help="Share of images (whole patients) used for thresholds and est_dice; the same split `lungkit train` makes with the same data and seed.")] = defaults.TRAIN["val_fraction"],
    seed: SeedOpt = defaults.TRAIN["seed"],
    refit_gate: Annotated[bool, typer.Option("--refit-gate", help="With data in fewer conventions than the model draws (fewer collections than it was calibrated on), fit the image gate on this data alone; by default the stored one is kept (refitted on one collection it flags most clean CXRs of others).")] = False,
    negatives: Annotated[list[Path] | None, typer.Option("--negatives", help="A folder of images that are not frontal chest X-rays (lateral views, CT or MR slices, anything else; a subfolder named lateral/, cross-sectional/ or other/ says which): the image gate becomes a view gate, frontal against these. Repeatable.")] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Fit the input gate (ood_score) and the quality estimate (est_dice) of a model and store them with it.

    The image gate and mask-shape statistics come from the training split, the thresholds and the est_dice
    regressor from the validation patients. With --negatives the image gate is a classifier of the view (frontal
    or not) that holds on collections it never saw; without, a density of the training images' features. Use
    the split the model was trained with (same DATA, --val-fraction and --seed), or annotated data the model
    never saw.

    Example: lungkit calibrate runs/seg/pairs.csv -w runs/seg/best.safetensors

    A model with an output per convention needs data in each:
    lungkit calibrate cxr-seg.csv cxr-seg-jsrt.csv --convention v7 \\
        --convention jsrt -w runs/both -o runs/both-cal

    With images that are not frontal CXRs (lateral/, cross-sectional/ inside):
    lungkit calibrate pairs.csv -w runs/seg --negatives not-frontal/
    """
    from lungmask_kit.training.calibrate import calibrate_model

    reports = calibrate_model([str(d) for d in data], weights, out, val_fraction, seed, device, progress=not quiet,
                              log=(lambda s: None) if quiet else typer.echo,
                              conventions=[c.value for c in convention or [Convention.v7]], refit_gate=refit_gate,
                              negatives=negatives or [])
    if not quiet:
        for name, report in reports.items():
            typer.echo(table(_rows(report), title=f"lungkit calibrate summary: {name} convention"))


def _rows(r: dict) -> list[tuple[str, object]]:
    cv, tta = r["est_dice_cv"], r["est_dice_tta_cv"]
    return [
        ("images (train / val)", f"{r['n_train_images']} / {r['n_val_images']} ({r['n_val_patients']} val patients)"),
        ("validation Dice mean", r["val_dice_mean"]),
        ("est_dice (held-out patients)", f"Spearman {cv.get('spearman', 'n/a')}, MAE {cv.get('mae', 'n/a')}"),
        ("est_dice with --tta", f"Spearman {tta.get('spearman', 'n/a')}, MAE {tta.get('mae', 'n/a')}"),
        ("min_est_dice", r["min_est_dice"]),
        ("image gate", r.get("image_gate", "density")),
        ("validation flagged", f"gate {r['val_flagged_by_gate']:.1%}, est_dice {r['val_flagged_by_est_dice']:.1%}"),
        ("weights", r["weights"]),
    ]


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)

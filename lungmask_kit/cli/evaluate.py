"""`lungkit evaluate`: segmentation quality against ground-truth masks."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit.cli._options import OutOpt, QuietOpt
from lungmask_kit.cli._output import table
from lungmask_kit.choices import Convention


def evaluate(
    predictions: Annotated[Path, typer.Argument(help="A segment manifest.parquet or a folder of predicted masks.")],
    out: OutOpt,
    truth: Annotated[Path | None, typer.Option("--truth", "-t", help="Folder of ground-truth masks, matched by relative path / stem.")] = None,
    truth_chexmask: Annotated[Path | None, typer.Option("--truth-chexmask", metavar="CSV", help="Or: CheXmask's masks as the truth (a CheXmask CSV; right and left lung scored apart; jsrt convention).")] = None,
    chexmask_id: Annotated[str | None, typer.Option("--chexmask-id", metavar="COLUMN", help="The CheXmask CSV's image id column (default: the first of dicom_id, Path, Image Index, ImageID, image_id).")] = None,
    truth_heart: Annotated[Path | None, typer.Option("--truth-heart", metavar="DIR", help="Folder of ground-truth heart masks: heart Dice and HD95 against the run's heart masks.")] = None,
    truth_ctr: Annotated[Path | None, typer.Option("--truth-ctr", metavar="CSV", help="CSV of cardiothoracic ratios (an image column path, name or image, and --ctr-column): the run's ctr against it.")] = None,
    ctr_column: Annotated[str, typer.Option("--ctr-column", metavar="COLUMN", help="The --truth-ctr column holding the ratio.")] = "ctr",
    convention: Annotated[Convention | None, typer.Option("--convention", help="What the truth masks outline (v7 = whole lung, behind the heart included; jsrt = visible lung fields); predictions of a manifest in the other convention are refused; default: not said.")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Per-image Dice, IoU and HD95 (pixels, native resolution), with mean / median / min; the heart's Dice and
    the cardiothoracic ratio's error where their truths are given.

    Writes OUT/metrics.parquet (one row per image) and OUT/summary.json. When PREDICTIONS is a manifest with
    est_dice, also how well it tracks the measured Dice (Spearman, mean absolute error, bias): check the
    quality estimate on your own annotated subset.

    Example: lungkit evaluate out/sample/manifest.parquet -o out/eval \\
        --truth examples/cxr-sample/masks
    """
    from lungmask_kit.errors import LungkitError
    from lungmask_kit.evaluate import METRICS, evaluate_masks

    if truth is not None and truth_chexmask is not None:
        raise LungkitError("give the lung truth once: --truth MASKS or --truth-chexmask CSV")
    if truth is None and truth_chexmask is None and truth_heart is None and truth_ctr is None:
        raise LungkitError("give a truth: --truth MASKS, --truth-chexmask CSV, --truth-heart DIR or --truth-ctr CSV")
    s = evaluate_masks(predictions, truth, out, progress=not quiet, truth_convention=convention and convention.value,
                       truth_chexmask=truth_chexmask, chexmask_id=chexmask_id, truth_heart=truth_heart,
                       truth_ctr=truth_ctr, ctr_column=ctr_column)
    if not quiet:
        said = lambda c: c or "not said"  # noqa: E731
        rows = [("convention (truth / predictions)", f"{said(s['truth_convention'])} / {said(s['prediction_convention'])}"),
                ("images", s["n"]), ("errors", s["n_error"])]
        for metric in METRICS:
            v = s[metric]
            if v is None and metric.startswith(("heart", "ctr")):
                continue  # no heart or CTR truth given
            rows.append((metric, "n/a" if v is None else f"mean {v['mean']:.4f}  median {v['median']:.4f}  min {v['min']:.4f}  max {v['max']:.4f}  (n={v['n']})"))
        if s.get("ctr_null"):
            rows.append(("CTR truths without a run CTR", s["ctr_null"]))
        if (e := s.get("est_dice")) is not None:
            rows.append(("est_dice vs Dice", f"Spearman {e['spearman']:.3f}  MAE {e['mae']:.4f}  bias {e['bias']:+.4f}  (n={e['n']})"))
        rows.append(("unmatched predictions / truths", f"{s['unmatched_predictions']} / {s['unmatched_truths']}"))
        if s.get("truth_resized"):
            rows.append(("CheXmask truths resized (nearest)", s["truth_resized"]))
        if s.get("chexmask_ambiguous"):
            rows.append(("CheXmask ids refused as ambiguous", s["chexmask_ambiguous"]))
        typer.echo(table(rows, title="lungkit evaluate summary"))
    if s["n_error"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate)

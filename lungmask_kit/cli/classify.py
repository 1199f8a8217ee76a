"""`lungkit classify`: COVID-19 classifiers on original / lungs-only / lungs-removed images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit.choices import Channels, Normalization, VariantChoice
from lungmask_kit.cli._options import BatchSizeOpt, DeviceOpt, EpochsOpt, InputRootOpt, LabelsOpt, LrOpt, OutOpt, QuietOpt, SeedOpt


def classify(
    manifest: Annotated[Path, typer.Argument(help="A manifest.parquet from lungkit segment or lungkit variants.")],
    out: OutOpt,
    variant: Annotated[VariantChoice, typer.Option("--variant", help="Which variant's classifier to train (all: the three).")] = VariantChoice.all,
    normalize: Annotated[Normalization, typer.Option("--normalize", help="dataset: mean/std of the training split; imagenet: ImageNet's.")] = Normalization.dataset,
    channels: Annotated[Channels, typer.Option("--channels", help="gray: 1 channel; rgb: gray replicated to 3.")] = Channels.gray,
    arch: Annotated[str, typer.Option("--arch", help="Any timm model name.")] = "resnet18",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="ImageNet weights from the hub (needs the network).")] = False,
    image_size: Annotated[int, typer.Option("--image-size", min=32, help="Square input size.")] = 224,
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 32,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.05, max=0.9, help="Share of patients held out when the manifest has no split column.")] = 0.2,
    positive: Annotated[str | None, typer.Option("--positive", help="The positive label [default: the one containing covid/positive].")] = None,
    labels: LabelsOpt = None,
    labels_from_folders: Annotated[bool, typer.Option("--labels-from-folders", help="Label = first folder of each image path (folder-per-class).")] = False,
    input_root: InputRootOpt = None,
    include_flagged: Annotated[bool, typer.Option("--include-flagged", help="Keep images that failed the lung-area QC.")] = False,
    eval_only: Annotated[bool, typer.Option("--eval-only", help="Score --checkpoint on this manifest without training.")] = False,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A classifier .safetensors written by lungkit classify.")] = None,
    device: DeviceOpt = "auto",
    quiet: QuietOpt = False,
) -> None:
    """Train one classifier per variant, test on held-out patients, and compare accuracy, sensitivity,
    specificity, precision, recall, F1 and ROC AUC.

    Writes OUT/metrics.json, OUT/predictions.parquet, OUT/results.md, OUT/roc.png, OUT/metrics.png,
    OUT/checkpoints/.
    Class imbalance: BCE weighted by n_negative / n_positive of the training split.

    Examples:

      lungkit classify out/cls/manifest.parquet -o runs/cls --variant all --image-size 128 --epochs 8

      lungkit classify other/manifest.parquet -o runs/eval --eval-only --checkpoint runs/cls/checkpoints/lungs.safetensors
    """
    from lungmask_kit.classify import ClassifySettings, comparison_table, run_classify, variants_to_run
    from lungmask_kit.errors import LungkitError

    if eval_only != (checkpoint is not None):
        raise LungkitError("--eval-only and --checkpoint go together")
    settings = ClassifySettings(
        variants=variants_to_run(variant.value, checkpoint), normalize=normalize.value, channels=channels.value, arch=arch, pretrained=pretrained,
        image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, test_fraction=test_fraction,
        positive=positive, include_flagged=include_flagged, labels_from_folders=labels_from_folders,
        input_root=str(input_root) if input_root else None,
    )
    result = run_classify(manifest, out, settings, device, labels_files=list(labels or []),
                          checkpoint=checkpoint, progress=not quiet, log=(lambda s: None) if quiet else typer.echo)
    if not quiet:
        typer.echo(comparison_table(result["metrics"], settings))
        typer.echo(f"train {result['n_train']} / test {result['n_test']} images, {result['seconds']:.0f} s; outputs in {out}")


def register(app: typer.Typer) -> None:
    app.command("classify")(classify)

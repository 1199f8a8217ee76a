"""`lungkit classify`: COVID-19 classifiers on original / lungs-only / lungs-removed images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit.choices import CacheKind, Channels, Init, Normalization, Precision, VariantChoice
from lungmask_kit.cli._options import BatchSizeOpt, DeviceOpt, EpochsOpt, InputRootOpt, LabelsOpt, LrOpt, OutOpt, QuietOpt, SeedOpt


def classify(
    manifest: Annotated[Path, typer.Argument(help="A segment or variants output folder (or its manifest.parquet).", metavar="OUT")],
    out: OutOpt,
    variant: Annotated[VariantChoice, typer.Option("--variant", help="Which variant's classifier to train (all: the three).")] = VariantChoice.all,
    normalize: Annotated[Normalization, typer.Option("--normalize", help="dataset: mean/std of the training split; imagenet: ImageNet's.")] = Normalization.dataset,
    channels: Annotated[Channels, typer.Option("--channels", help="gray: 1 channel; rgb: gray replicated to 3.")] = Channels.gray,
    arch: Annotated[str, typer.Option("--arch", help="Any timm model name.")] = "resnet18",
    pretrained: Annotated[bool, typer.Option("--pretrained/--no-pretrained", help="Same as --init imagenet (needs the network).")] = False,
    init: Annotated[Init, typer.Option("--init", help="scratch; imagenet (needs the network); segmenter: a DenseNet121 started from the bundled segmenter's encoder (offline).")] = Init.scratch,
    seeds: Annotated[int, typer.Option("--seeds", min=1, help="Models per variant (seeds SEED, SEED+1, ...); metrics are their mean with patient-bootstrap 95% intervals.")] = 3,
    bootstrap: Annotated[int, typer.Option("--bootstrap", min=100, help="Bootstrap replicates for the intervals and comparisons.")] = 1000,
    saliency: Annotated[bool, typer.Option("--saliency/--no-saliency", help="Grad-CAM share of attribution inside the lungs (saliency_in_lungs).")] = True,
    leakage: Annotated[bool, typer.Option("--leakage/--no-leakage", help="With a source column: predict the source from each variant, and leave-one-source-out evaluation.")] = True,
    cache: Annotated[CacheKind, typer.Option("--cache", help="memory, or disk: a memory-mapped image cache in OUT/.lungkit-cache, removed at the end (flat memory for 100k+ images).")] = CacheKind.memory,
    image_size: Annotated[int, typer.Option("--image-size", min=32, help="Square input size.")] = 224,
    epochs: EpochsOpt = 10,
    batch_size: BatchSizeOpt = 32,
    lr: LrOpt = 1e-3,
    seed: SeedOpt = 0,
    test_fraction: Annotated[float, typer.Option("--test-fraction", min=0.05, max=0.9, help="Share of patients held out when the manifest has no split column.")] = 0.2,
    positive: Annotated[str | None, typer.Option("--positive", help="The positive label (default: the one containing covid/positive).")] = None,
    labels: LabelsOpt = None,
    labels_from_folders: Annotated[bool, typer.Option("--labels-from-folders", help="Label = first folder of each image path (folder-per-class).")] = False,
    patient_from: Annotated[str | None, typer.Option("--patient-from", metavar="REGEX", help="Patient id from each image path: the regex's first group (or whole match), e.g. 'patient(\\d+)'. Images without one are grouped by exact and near copies.")] = None,
    input_root: InputRootOpt = None,
    include_flagged: Annotated[bool, typer.Option("--include-flagged", help="Also use images flagged by QC (any reason: lung area, input gate, est_dice, declared view, CTR; failed ones never).")] = False,
    eval_only: Annotated[bool, typer.Option("--eval-only", help="Score --checkpoint on this manifest without training.")] = False,
    checkpoint: Annotated[Path | None, typer.Option("--checkpoint", help="A classifier .safetensors written by lungkit classify.")] = None,
    device: DeviceOpt = "auto",
    precision: Annotated[Precision, typer.Option("--precision", help="auto: bf16 autocast on CUDA and on a CPU with bf16 units (AVX512-BF16 or AMX), fp32 elsewhere; Grad-CAM runs in fp32.")] = Precision.auto,
    quiet: QuietOpt = False,
) -> None:
    """A shortcut audit: --seeds classifiers per variant on held-out patients; accuracy, sensitivity, specificity,
    precision, recall, F1 and ROC AUC with patient-bootstrap 95% intervals; paired comparisons of the variants;
    Grad-CAM share inside the lungs; with a source column, source prediction and leave-one-source-out.

    Writes OUT/metrics.json, OUT/predictions.parquet, OUT/results.md, OUT/roc.png, OUT/metrics.png,
    OUT/saliency.png, OUT/checkpoints/. Class imbalance: BCE weighted by n_negative / n_positive of the
    training split.

    Examples:

      lungkit classify out/cls/manifest.parquet -o runs/cls --variant all \\
          --image-size 128 --epochs 8

      lungkit classify other/manifest.parquet -o runs/eval --eval-only \\
          --checkpoint runs/cls/checkpoints/lungs.safetensors
    """
    from lungmask_kit.classify import ClassifySettings, comparison_table, run_classify, variants_to_run
    from lungmask_kit.errors import LungkitError

    if eval_only != (checkpoint is not None):
        raise LungkitError("--eval-only and --checkpoint go together")
    settings = ClassifySettings(
        variants=variants_to_run(variant.value, checkpoint), normalize=normalize.value, channels=channels.value, arch=arch,
        pretrained=pretrained, init="imagenet" if pretrained and init is Init.scratch else init.value, seeds=seeds,
        bootstrap=bootstrap, saliency=saliency, leakage=leakage, cache=cache.value,
        image_size=image_size, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, test_fraction=test_fraction,
        positive=positive, include_flagged=include_flagged, labels_from_folders=labels_from_folders, patient_from=patient_from, precision=precision.value,
        input_root=str(input_root) if input_root else None,
    )
    result = run_classify(manifest, out, settings, device, labels_files=list(labels or []),
                          checkpoint=checkpoint, progress=not quiet, log=(lambda s: None) if quiet else typer.echo)
    if not quiet:
        typer.echo(comparison_table(result["metrics"], settings))
        typer.echo(f"train {result['n_train']} / test {result['n_test']} images, {result['seconds']:.0f} s; outputs in {out}")
    for warning in result.get("warnings", []):
        typer.echo(f"lungkit: warning: {warning}: intervals and p-values are left out (null in metrics.json)", err=True)


def register(app: typer.Typer) -> None:
    app.command("classify")(classify)

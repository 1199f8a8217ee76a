"""`lungkit train`: train a lung segmenter."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lungmask_kit import defaults
from lungmask_kit.cli._options import BatchSizeOpt, DeviceOpt, EpochsOpt, LrOpt, OutOpt, QuietOpt, SeedOpt
from lungmask_kit.choices import Convention, EncoderWeights, Precision


def train(
    data: Annotated[list[Path], typer.Argument(help="images/ + masks/ folder, COVID-QU-Ex root, or CSV (image,mask\\[,patient_id,split,convention]); several for a model with an output per convention.")],
    out: OutOpt,
    convention: Annotated[list[Convention] | None, typer.Option("--convention", help="What the masks of DATA outline: once for all DATA, or once per DATA in order (v7 = whole lung, behind the heart included; jsrt = visible lung fields). Default: v7.")] = None,
    init: Annotated[str | None, typer.Option("--init", help="Start from these weights (a .safetensors file or folder; 'default': the bundled model) instead of --encoder-weights; outputs are matched by convention.")] = None,
    precision: Annotated[Precision, typer.Option("--precision", help="auto: bf16 autocast on CUDA and on a CPU with bf16 units (AVX512-BF16 or AMX), fp32 elsewhere.")] = Precision.auto,
    arch: Annotated[str, typer.Option(help="segmentation_models_pytorch architecture.")] = defaults.SEGMENTER["arch"],
    encoder: Annotated[str, typer.Option(help="Encoder name.")] = defaults.SEGMENTER["encoder"],
    in_channels: Annotated[int, typer.Option("--in-channels", min=1, max=3, help="1 (grayscale) or 3.")] = 1,
    encoder_weights: Annotated[EncoderWeights, typer.Option("--encoder-weights", help="none: random initialisation; imagenet: downloaded (needs the network).")] = EncoderWeights.none,
    epochs: EpochsOpt = defaults.TRAIN["epochs"],
    batch_size: BatchSizeOpt = defaults.TRAIN["batch_size"],
    lr: LrOpt = defaults.TRAIN["lr"],
    val_fraction: Annotated[float, typer.Option("--val-fraction", min=0.01, max=0.9, help="Share of images (whole patients) held out.")] = defaults.TRAIN["val_fraction"],
    seed: SeedOpt = defaults.TRAIN["seed"],
    name: Annotated[str, typer.Option(help="Model name recorded in its config.")] = "lungkit-segmenter",
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run in --out.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Train a segmenter (FPN + DenseNet121 by default) with Dice + BCE + Focal loss.

    Example: lungkit train data/cxr-seg -o runs/seg --epochs 36

    Both conventions, fine-tuned from the bundled model:
    lungkit train cxr-seg.csv cxr-seg-jsrt.csv --convention v7 \\
        --convention jsrt --init default -o runs/both
    """
    from lungmask_kit.training.trainer import TrainSettings
    from lungmask_kit.training.trainer import train as run_train

    settings = TrainSettings(
        data=[str(d) for d in data], out=str(out), conventions=[c.value for c in convention or [Convention.v7]],
        init=init, precision=precision.value, arch=arch, encoder=encoder, in_channels=in_channels,
        encoder_weights=None if encoder_weights is EncoderWeights.none else encoder_weights.value, epochs=epochs,
        batch_size=batch_size, lr=lr, val_fraction=val_fraction, seed=seed, name=name,
    )
    summary = run_train(settings, device, resume=resume, progress=not quiet,
                        log=(lambda s: None) if quiet else typer.echo)
    typer.echo(f"best validation Dice (256 px) {summary['best_val_dice']:.4f}; weights: {out / 'best.safetensors'}")


def register(app: typer.Typer) -> None:
    app.command("train")(train)

"""The segmenter training loop: AdamW, warmup + cosine schedule, best-Dice checkpoints, resumable."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.utils.data import DataLoader

from lungmask_kit import __version__, defaults
from lungmask_kit.choices import CONVENTIONS
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import atomic_write_bytes
from lungmask_kit.models.modeling import LoadedModel, ModelConfig, build_model, initialise_from, load_bundle, save_model
from lungmask_kit.runtime import prepare_device, training_autocast
from lungmask_kit.stats import pixel_mean_std
from lungmask_kit.training.augment import eval_transform, train_transform
from lungmask_kit.training.calibrate import calibrate
from lungmask_kit.training.data import Pair, PairDataset, data_sources, load_pair, split_sources
from lungmask_kit.training.loop import train_epoch
from lungmask_kit.training.losses import ComboLoss, per_output_loss, supervised

# progress lines go here unless the caller passes `log` (the CLI passes typer.echo); silent by default
logger = logging.getLogger(__name__)


@dataclass
class TrainSettings:
    data: str | list[str]  # one or more folders / CSVs
    out: str
    conventions: list[str] = field(default_factory=lambda: [defaults.CONVENTION])  # one for all data, or one per data
    init: str | None = None  # weights to start from ("default": the bundled model); None: --encoder-weights
    precision: str = "auto"  # auto | fp32 | bf16 (runtime.training_autocast)
    arch: str = defaults.SEGMENTER["arch"]
    encoder: str = defaults.SEGMENTER["encoder"]
    in_channels: int = defaults.SEGMENTER["in_channels"]
    input_size: int = defaults.INPUT_SIZE
    encoder_weights: str | None = None
    epochs: int = defaults.TRAIN["epochs"]
    batch_size: int = defaults.TRAIN["batch_size"]
    lr: float = defaults.TRAIN["lr"]
    weight_decay: float = defaults.TRAIN["weight_decay"]
    warmup_epochs: int = defaults.TRAIN["warmup_epochs"]
    val_fraction: float = defaults.TRAIN["val_fraction"]
    seed: int = defaults.TRAIN["seed"]
    name: str = "lungkit-segmenter"
    extra: dict = field(default_factory=dict)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def per_image_dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Binary (N, 1, H, W) -> (N,) Dice; two empty masks agree perfectly."""
    pred, target = pred.flatten(1).float(), target.flatten(1).float()
    inter = (pred * target).sum(1)
    denom = pred.sum(1) + target.sum(1)
    return torch.where(denom > 0, 2 * inter / (denom + eps), torch.ones_like(denom))


def _save_state(path: Path, model, optimizer, meta: dict) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for idx, st in opt["state"].items():
        for key, value in st.items():
            tensors[f"opt.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    atomic_write_bytes(path.with_suffix(".safetensors"), save(tensors))
    meta = {**meta, "param_groups": opt["param_groups"]}
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(meta, indent=2).encode())


def _load_state(path: Path, model, optimizer) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(str(path.with_suffix(".safetensors")))
    meta = json.loads(path.with_suffix(".json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, idx, key = k.split(".", 2)
            state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return meta


def train(
    settings: TrainSettings,
    device: str | torch.device = "auto",
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = logger.info,
) -> dict:
    """Train a segmenter; writes best.safetensors/.json, last training state and a per-epoch log. Returns a summary."""
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "train_state"
    if resume and not state_path.with_suffix(".json").exists():
        raise LungkitError(f"--resume: no training state in {out}")
    if settings.in_channels not in (1, 3):
        raise LungkitError(f"in_channels must be 1 or 3 (got {settings.in_channels})")
    device = prepare_device(device)
    autocast = training_autocast(settings.precision, device)
    _seed_all(settings.seed)

    train_pairs, val_pairs, by_patient = split_sources(data_sources(settings.data, settings.conventions), settings.val_fraction, settings.seed)
    if not train_pairs or not val_pairs:
        raise LungkitError(f"need both training and validation pairs (got {len(train_pairs)} / {len(val_pairs)})")
    if not by_patient:
        log("warning: no patient_id in (some of) the data; validation is split by image and may leak patients")
    parent = load_bundle(None if settings.init == "default" else settings.init) if settings.init else None
    config = _model_config(settings, train_pairs, val_pairs, by_patient, parent)
    size, outputs = config.input_size, config.outputs
    train_ds = PairDataset(train_pairs, size, settings.in_channels, train_transform(config.mean, config.std), outputs)
    val_ds = PairDataset(val_pairs, size, settings.in_channels, eval_transform(config.mean, config.std), outputs)
    atomic_write_bytes(
        out / "split.json",
        json.dumps({"train": [str(p.image) for p in train_pairs], "val": [str(p.image) for p in val_pairs]}, indent=1).encode(),
    )

    model = build_model(config, None if parent else settings.encoder_weights)
    if parent is not None:
        initialise_from(model, config, parent)
        log(f"initialised from {parent.path.name} ({parent.config.name}; outputs {', '.join(outputs)})")
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    combo = ComboLoss()

    def loss_fn(logits, target):
        return per_output_loss(combo, logits.float(), target)

    steps_per_epoch = math.ceil(len(train_ds) / settings.batch_size)
    total_steps = steps_per_epoch * settings.epochs
    warmup = steps_per_epoch * settings.warmup_epochs
    start_epoch, best_dice, history = 0, -1.0, []
    if resume:
        meta = _load_state(state_path, model, optimizer)
        start_epoch, best_dice, history = meta["epoch"] + 1, meta["best_dice"], meta["history"]
        log(f"resuming after epoch {meta['epoch'] + 1} (best val Dice {best_dice:.4f})")

    t0 = time.perf_counter()
    for epoch in range(start_epoch, settings.epochs):
        _seed_all(settings.seed + epoch)  # epoch-level seeding makes --resume reproduce the same batches
        loader = DataLoader(train_ds, batch_size=settings.batch_size, shuffle=True, drop_last=len(train_ds) > settings.batch_size)
        t_epoch = time.perf_counter()

        def set_lr(i: int, epoch: int = epoch) -> None:
            for g in optimizer.param_groups:
                g["lr"] = _lr_at(epoch * steps_per_epoch + i, total_steps, warmup, settings.lr)

        train_loss = train_epoch(model, loader, loss_fn, optimizer, device, f"epoch {epoch + 1}/{settings.epochs}",
                                 progress, before_step=set_lr, autocast=autocast)
        val_loss, dices, channels = _validate(model, val_ds, loss_fn, device, settings.batch_size, autocast)
        by_convention = _dice_by_output(dices, channels, outputs)
        row = {
            "epoch": epoch + 1,
            "train_loss": round(train_loss, 5),
            "val_loss": round(val_loss, 5),
            # each output's validation images count alike (a convention's, the heart's), however many each has
            "val_dice_mean": round(float(np.mean(list(by_convention.values()))), 5),
            "val_dice_min": round(float(dices.min()), 5),
            **{f"val_dice_{c}": round(v, 5) for c, v in by_convention.items() if len(by_convention) > 1},
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_seconds": round(time.perf_counter() - t_epoch, 1),
        }
        history.append(row)
        if row["val_dice_mean"] > best_dice:
            best_dice = row["val_dice_mean"]
            best_cfg = dataclasses.replace(
                config, provenance={**config.provenance, "best_epoch": epoch + 1, "val_dice_256px": best_dice}
            )
            save_model(model, best_cfg, out / "best.safetensors")
        _save_state(state_path, model, optimizer, {"epoch": epoch, "best_dice": best_dice, "history": history})
        _write_log(out, history)
        each = "".join(f" {c} {v:.4f}" for c, v in by_convention.items()) if len(by_convention) > 1 else ""
        log(
            f"epoch {epoch + 1}/{settings.epochs}  loss {row['train_loss']:.4f}  val loss {row['val_loss']:.4f}  "
            f"val Dice {row['val_dice_mean']:.4f}{each} (min {row['val_dice_min']:.4f})  {row['epoch_seconds']}s"
        )

    # the input gate and est_dice of this model, fitted on its own split and stored with best.safetensors
    quality = calibrate(out / "best.safetensors", train_pairs, val_pairs, device, progress=progress, log=log)
    return {"best_val_dice": best_dice, "epochs": settings.epochs, "seconds": round(time.perf_counter() - t0, 1),
            "n_train": len(train_ds), "n_val": len(val_ds), "out": str(out),
            "quality": {c: m.report for c, m in quality.items()}}


def _model_config(settings: TrainSettings, train_pairs: list[Pair], val_pairs: list[Pair], by_patient: bool,
                  parent: LoadedModel | None) -> ModelConfig:
    """The new model's config: one output per convention in the data (the default first), then a heart output
    where the data has heart masks; the normalisation of the parent model when fine-tuning, else the training
    images' own statistics."""
    outputs = sorted({p.convention for p in train_pairs + val_pairs}, key=CONVENTIONS.index)
    structures = ["heart"] if any(p.heart for p in train_pairs + val_pairs) else []
    if parent is not None:
        mean, std = parent.config.mean, parent.config.std
    else:
        m, s, _ = pixel_mean_std(load_pair(p, settings.input_size)[0] for p in train_pairs)
        mean, std = [round(m, 6)] * settings.in_channels, [round(s, 6)] * settings.in_channels
    count = {c: {"train": sum(p.convention == c for p in train_pairs), "val": sum(p.convention == c for p in val_pairs)}
             for c in outputs}
    if structures:
        count["heart"] = {"train": sum(p.heart is not None for p in train_pairs),
                          "val": sum(p.heart is not None for p in val_pairs)}
    training = {k: v for k, v in dataclasses.asdict(settings).items() if k != "extra"} | settings.extra
    return ModelConfig(
        name=settings.name, arch=settings.arch, encoder=settings.encoder, in_channels=settings.in_channels,
        input_size=settings.input_size, classes=len(outputs) + len(structures), conventions=outputs,
        structures=structures, mean=mean, std=std,
        provenance={
            "lungkit_version": __version__, "training": training,
            "initialised_from": parent and {"name": parent.config.name, "sha256": parent.sha256},
            "n_train": len(train_pairs), "n_val": len(val_pairs), "images_per_convention": count,
            "val_split": "patient" if by_patient else "image",
        },
    )


def _dice_by_output(dices: torch.Tensor, channels: torch.Tensor, outputs: list[str]) -> dict[str, float]:
    return {outputs[c]: float(dices[channels == c].mean()) for c in sorted(channels.unique().tolist())}


@torch.inference_mode()
def _validate(model, ds: PairDataset, loss_fn, device, batch_size: int, autocast: torch.dtype | None):
    model.eval()
    total, dices, channels = 0.0, [], []
    for x, y in DataLoader(ds, batch_size=batch_size):
        x = x.to(device, memory_format=torch.channels_last)
        y = y.to(device)
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            logits = model(x).float()
        total += loss_fn(logits, y).item() * len(x)
        logits, y, channel = supervised(logits, y)
        dices.append(per_image_dice(logits > 0, y > 0.5).cpu())
        channels.append(channel.cpu())
    return total / len(ds), torch.cat(dices), torch.cat(channels)


def _write_log(out: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_bytes(out / "log.csv", buf.getvalue().encode())
    atomic_write_bytes(out / "log.json", json.dumps(history, indent=1).encode())

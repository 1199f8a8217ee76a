"""The audit's models: a timm classifier built from settings (from scratch, ImageNet, or initialised from the
bundled segmenter's DenseNet121 encoder), trained by `training.loop.fit`, its predictions, and Grad-CAM maps.

Shape contract: images enter as (N, size, size) uint16 rows of an ImageCache array; probabilities leave as (N,)
for a binary task and (N, K) for K classes; Grad-CAM maps as (N, size, size) float32, non-negative.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lungmask_kit import __version__, defaults
from lungmask_kit.errors import LungkitError
from lungmask_kit.models.modeling import DEFAULT_WEIGHTS, ModelConfig, build_model, save_model
from lungmask_kit.runtime import training_autocast
from lungmask_kit.training.loop import fit

IMAGENET_GRAY_MEAN = float(np.mean(defaults.IMAGENET_MEAN))  # ImageNet stats averaged for 1-channel input
IMAGENET_GRAY_STD = float(np.mean(defaults.IMAGENET_STD))


class CachedImages(Dataset):
    """Rows of an ImageCache array with their targets: (C, size, size) float32 normalised, target float (binary)
    or int64 (classes). Light augmentation (flip, small affine) for training."""

    def __init__(self, array: np.ndarray, rows: np.ndarray, targets, mean, std, in_channels: int, augment: bool,
                 classes: int = 1):
        from torchvision.transforms import v2

        self.array, self.rows, self.targets = array, rows, list(targets)
        self.in_channels, self.classes = in_channels, classes
        ops = [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.95, 1.05))] if augment else []
        self.transform = v2.Compose([*ops, v2.Normalize(list(mean), list(std))])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        from torchvision import tv_tensors

        from lungmask_kit.classify.data import ImageCache

        x = torch.from_numpy(self.array[self.rows[i]].astype(np.float32) / ImageCache.SCALE)[None]
        x = x.expand(self.in_channels, -1, -1)
        target = torch.tensor(float(self.targets[i])) if self.classes == 1 else torch.tensor(int(self.targets[i]))
        return self.transform(tv_tensors.Image(x)).as_subclass(torch.Tensor), target


def normalisation(settings, cache, variant: str, train) -> tuple[list[float], list[float], int]:
    """(mean, std, channels): the training split's statistics, or ImageNet's."""
    in_channels = 1 if settings.channels == "gray" else 3
    if settings.normalize == "dataset":
        m, s = cache.mean_std(variant, train)
        return [m] * in_channels, [s] * in_channels, in_channels
    if in_channels == 3:
        return list(defaults.IMAGENET_MEAN), list(defaults.IMAGENET_STD), in_channels
    return [IMAGENET_GRAY_MEAN], [IMAGENET_GRAY_STD], in_channels


def classifier_config(settings, variant: str, mean, std, in_channels: int, classes: int = 1, task: str = "covid") -> ModelConfig:
    arch = "densenet121" if settings.init == "segmenter" else settings.arch
    return ModelConfig(
        name=f"lungkit-classifier-{variant}" + ("" if task == "covid" else f"-{task}"), task="classification",
        arch=arch, encoder=arch, in_channels=in_channels, classes=classes, input_size=settings.image_size,
        mean=[round(v, 6) for v in mean], std=[round(v, 6) for v in std], threshold=settings.threshold,
        provenance={"lungkit_version": __version__, "variant": variant, "target": task,
                    "settings": dataclasses.asdict(settings)},
    )


def build_classifier(config: ModelConfig, init: str) -> torch.nn.Module:
    model = build_model(config, "imagenet" if init == "imagenet" else None)
    if init == "segmenter":
        load_segmenter_encoder(model, config.in_channels)
    return model


def load_segmenter_encoder(model: torch.nn.Module, in_channels: int) -> int:
    """Copy the bundled segmenter's DenseNet121 encoder (trained on chest X-rays; present offline) into a timm
    densenet121 classifier; a 3-channel classifier gets the gray first convolution spread over its channels.
    Returns how many tensors were copied."""
    from safetensors.torch import load_file

    encoder = {k[len("encoder."):]: v for k, v in load_file(str(DEFAULT_WEIGHTS)).items() if k.startswith("encoder.")}
    own = model.state_dict()
    copied = {}
    for name, tensor in encoder.items():
        if name not in own:
            continue
        tensor = tensor.to(own[name].dtype)  # the bundled weights are stored in half precision
        if name == "features.conv0.weight" and own[name].shape[1] != tensor.shape[1]:
            tensor = tensor.repeat(1, own[name].shape[1], 1, 1) / own[name].shape[1]
        if own[name].shape == tensor.shape:
            copied[name] = tensor
    if len(copied) < 0.9 * len([k for k in own if k.startswith("features.")]):
        raise LungkitError("the bundled segmenter's encoder does not fit this classifier (--init segmenter needs densenet121)")
    model.load_state_dict(copied, strict=False)
    return len(copied)


def train_model(model, train_ds: CachedImages, settings, seed: int, device, progress: bool, log, label: str):
    """Fit with AdamW + one-cycle; binary targets use BCE weighted by n_negative / n_positive, classes use
    cross-entropy weighted by inverse class frequency."""

    targets = np.asarray(train_ds.targets)
    if train_ds.classes == 1:
        n_pos = float(targets.sum())
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor((len(targets) - n_pos) / max(n_pos, 1.0), device=device))
        compute = lambda logits, y: loss_fn(logits.float()[:, 0], y)  # noqa: E731
    else:
        counts = np.bincount(targets.astype(int), minlength=train_ds.classes).astype(np.float32)
        weights = torch.tensor(len(targets) / (train_ds.classes * np.maximum(counts, 1)), device=device)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
        compute = lambda logits, y: loss_fn(logits.float(), y)  # noqa: E731
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_ds, batch_size=settings.batch_size, shuffle=True,
                        drop_last=len(train_ds) > settings.batch_size, generator=g)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps = settings.epochs * max(1, len(loader))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps, pct_start=0.15)
    fit(model, loader, compute, optimizer, device, settings.epochs, scheduler=scheduler, progress=progress,
        log=log, label=label, autocast=training_autocast(settings.precision, device))
    return model


@torch.inference_mode()
def predict(model, ds: CachedImages, device, batch_size: int, precision: str = "auto") -> np.ndarray:
    """Probabilities of the positive class (or of each class), under the run's --precision (Grad-CAM stays fp32)."""
    dtype = training_autocast(precision, device)
    model.eval()
    out = []
    for x, _ in DataLoader(ds, batch_size=batch_size):
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x.to(device, memory_format=torch.channels_last)).float()
        out.append((torch.sigmoid(logits[:, 0]) if logits.shape[1] == 1 else torch.softmax(logits, 1)).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def gradcam(model, x: torch.Tensor, target: int = 0) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of output `target` w.r.t. the last feature map: (N, H, W) float32, ReLU'd,
    upsampled to the input size. Needs timm's `forward_features` / `forward_head` split."""

    model.eval()
    with torch.enable_grad():
        features = model.forward_features(x).detach().requires_grad_(True)
        logits = model.forward_head(features)
        score = logits[:, target].sum()
        (grad,) = torch.autograd.grad(score, features)
    weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam.detach().float().cpu().numpy()


def saliency_in_lungs(cams: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per image: the share of positive attribution mass that falls inside the lung mask (NaN for an empty map)."""
    total = cams.reshape(len(cams), -1).sum(1)
    inside = (cams * masks).reshape(len(cams), -1).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, inside / total, np.nan)


def cams_for(model, ds: CachedImages, device, batch_size: int) -> np.ndarray:
    out = []
    for x, _ in DataLoader(ds, batch_size=batch_size):
        out.append(gradcam(model, x.to(device)))
    return np.concatenate(out) if out else np.zeros((0, 1, 1), np.float32)


def save_checkpoint(model, config: ModelConfig, path: Path) -> None:
    save_model(model, config, path)

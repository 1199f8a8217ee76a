"""Joint image + mask augmentation with torchvision.transforms.v2 (masks use nearest interpolation)."""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2


def train_transform(mean, std) -> v2.Compose:
    """Horizontal flip, elastic deformation, rotation with mild scale/shift, then normalisation."""
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ElasticTransform(alpha=25.0, sigma=6.0)], p=0.3),
            v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
            v2.Normalize(mean=list(mean), std=list(std)),
        ]
    )


def eval_transform(mean, std) -> v2.Compose:
    return v2.Compose([v2.Normalize(mean=list(mean), std=list(std))])


def apply_pair(transform: v2.Compose, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """image (C, H, W) float in [0, 1], mask (1, H, W) uint8 -> transformed pair, still aligned."""
    out_image, out_mask = transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
    return out_image.as_subclass(torch.Tensor), out_mask.as_subclass(torch.Tensor)

"""Combo loss for binary lung segmentation: Dice + BCE + Focal.

The published code computed the focal term on the *mean* BCE of the batch; here it is per pixel
(the definition of focal loss), which is what down-weights the easy background pixels.
"""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss, FocalLoss
from torch import nn


class ComboLoss(nn.Module):
    """logits (N, 1, H, W), target (N, 1, H, W) in {0, 1} -> scalar. Weights default to 1 each."""

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, focal_weight: float = 1.0, gamma: float = 2.0):
        super().__init__()
        self.weights = (dice_weight, bce_weight, focal_weight)
        self.dice = DiceLoss(mode="binary", from_logits=True)
        self.bce = nn.BCEWithLogitsLoss()
        self.focal = FocalLoss(mode="binary", gamma=gamma)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        wd, wb, wf = self.weights
        return wd * self.dice(logits, target) + wb * self.bce(logits, target) + wf * self.focal(logits, target)


def supervised(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K, H, W) logits and targets, channels without a mask for an image all negative (see
    `training.data.UNSUPERVISED`) -> (M, 1, H, W) logits and targets of the M supervised (image, channel)
    pairs, and (M,) the channel of each: an image is scored only on the outputs it has masks for."""
    image, channel = torch.nonzero(target[:, :, 0, 0] >= 0, as_tuple=True)
    return logits[image, channel][:, None], target[image, channel][:, None], channel


def per_output_loss(loss: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`loss` on each output channel's supervised images alone, averaged over the channels the batch supervises:
    a structure with fewer masks (the heart) weighs as much as the lungs in every batch that has it."""
    logits, target, channel = supervised(logits, target)
    return torch.stack([loss(logits[channel == c], target[channel == c]) for c in channel.unique()]).mean()

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


def own_channel(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, H, W) logits and targets with one supervised channel per image (the others all negative, see
    `training.data.UNSUPERVISED`) -> (N, 1, H, W) each: every image is scored only on its own convention."""
    index = (target[:, :, 0, 0] >= 0).to(torch.int64).argmax(1)[:, None, None, None]
    index = index.expand(-1, 1, *target.shape[2:])
    return logits.gather(1, index), target.gather(1, index)

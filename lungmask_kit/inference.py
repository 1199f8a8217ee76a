"""A loaded segmentation model that turns prepared batches into lung probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lungmask_kit.imaging import prepare_input
from lungmask_kit.models.modeling import load_model
from lungmask_kit.runtime import tune_malloc


class Segmenter:
    """Loads weights once; `prepare` maps (H, W) images to model inputs, `predict` runs a batch.

    Pre-processing (input size, mean/std, channels) comes only from the model's config.
    """

    def __init__(self, weights: str | Path | None, device: torch.device):
        if device.type == "cpu":
            tune_malloc()
        self.device = device
        model, self.config, self.weights_sha256 = load_model(weights, device)
        self.model = model.to(memory_format=torch.channels_last)
        self.weights_path = str(weights) if weights else "bundled default"

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        c = self.config
        return prepare_input(pixels, c.input_size, c.mean, c.std, c.in_channels)

    @torch.inference_mode()
    def predict(self, batch: np.ndarray, pad_to: int | None = None) -> np.ndarray:
        """(N, C, S, S) float32 -> (N, S, S) float32 probabilities.

        `pad_to` zero-pads a short batch: CPU kernels differ by batch size at the 1e-6 level, so a fixed
        batch size keeps masks byte-identical however a run was interrupted and resumed.
        """
        n = len(batch)
        if pad_to and n < pad_to:
            batch = np.concatenate([batch, np.zeros((pad_to - n, *batch.shape[1:]), batch.dtype)])
        x = torch.from_numpy(batch).to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            logits = self.model(x)
        return torch.sigmoid(logits[:n].float())[:, 0].cpu().numpy()

"""A loaded segmentation model that turns prepared batches into lung probabilities (and what quality needs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lungmask_kit.errors import WeightsError
from lungmask_kit.imaging import prepare_input
from lungmask_kit.models.modeling import load_bundle
from lungmask_kit.runtime import tune_malloc


@dataclass
class BatchPrediction:
    probabilities: np.ndarray  # (N, S, S) float32
    pooled: np.ndarray | None = None  # (N, D) float32: the encoder summary the input gate scores
    flipped: np.ndarray | None = None  # (N, S, S) probabilities of the mirrored input, mirrored back (--tta)


def pooled_features(deepest: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) deepest encoder map -> (N, 4C): 2x2 average pooling keeps the coarse layout (left/right,
    top/bottom) that tells a frontal CXR from a lateral one; the square root evens out activation scales."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(deepest.float(), 2)
    return pooled.clamp_min(0).sqrt().flatten(1)


class Segmenter:
    """Loads weights once; `prepare` maps (H, W) images to model inputs, `predict` runs a batch.

    Pre-processing (input size, mean/std, channels) comes only from the model's config; the quality model
    (input gate and est_dice) from the same config and weights file, when the model was calibrated.
    """

    def __init__(self, weights: str | Path | None, device: torch.device):
        from lungmask_kit.quality import QualityModel

        if device.type == "cpu":
            tune_malloc()
        self.device = device
        loaded = load_bundle(weights, device)
        self.config, self.weights_sha256 = loaded.config, loaded.sha256
        self.model = loaded.model.to(memory_format=torch.channels_last)
        self.weights_path = str(weights) if weights else "bundled default"
        self.quality = None
        if self.config.quality:
            try:
                self.quality = QualityModel.from_config(self.config.quality, loaded.quality_tensors)
            except (KeyError, ValueError, TypeError) as err:
                raise WeightsError(f"the quality statistics stored with {loaded.path} are unusable: {err}") from err
        self._deepest: torch.Tensor | None = None
        self.model.encoder.register_forward_hook(self._keep_deepest)

    def _keep_deepest(self, module, inputs, outputs) -> None:
        self._deepest = outputs[-1]

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        c = self.config
        return prepare_input(pixels, c.input_size, c.mean, c.std, c.in_channels)

    def predict(self, batch: np.ndarray, pad_to: int | None = None) -> np.ndarray:
        """(N, C, S, S) float32 -> (N, S, S) float32 probabilities."""
        return self.predict_batch(batch, pad_to).probabilities

    @torch.inference_mode()
    def predict_batch(self, batch: np.ndarray, pad_to: int | None = None, tta: bool = False) -> BatchPrediction:
        """Probabilities plus the pooled encoder features of the same forward pass; `tta` adds a mirrored pass.

        `pad_to` zero-pads a short batch: CPU kernels differ by batch size at the 1e-6 level, so a fixed
        batch size keeps masks byte-identical however a run was interrupted and resumed.
        """
        n = len(batch)
        if pad_to and n < pad_to:
            batch = np.concatenate([batch, np.zeros((pad_to - n, *batch.shape[1:]), batch.dtype)])
        x = torch.from_numpy(batch).to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        probs = self._forward(x)
        pooled = pooled_features(self._deepest[:n]).cpu().numpy()
        flipped = self._forward(x.flip(-1)).flip(-1)[:n].cpu().numpy() if tta else None
        return BatchPrediction(probs[:n].cpu().numpy(), pooled, flipped)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.device.type == "cuda"):
            logits = self.model(x)
        return torch.sigmoid(logits.float())[:, 0]

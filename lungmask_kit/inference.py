"""A loaded segmentation model that turns prepared batches into lung probabilities (and what quality needs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lungmask_kit import defaults
from lungmask_kit.accel import prepare_on_device
from lungmask_kit.errors import WeightsError
from lungmask_kit.imaging import prepare_input
from lungmask_kit.models.modeling import load_bundle
from lungmask_kit.quality import QualityModel, calibrated_for
from lungmask_kit.runtime import autocast_dtype, precision_name, tune_malloc


@dataclass
class BatchPrediction:
    probabilities: np.ndarray  # (N, S, S) float32: the lungs in the run's convention
    pooled: np.ndarray | None = None  # (N, D) float32: the encoder summary the input gate scores
    flipped: np.ndarray | None = None  # (N, S, S) probabilities of the mirrored input, mirrored back (--tta)
    # (N, S, S) float32 each, from the same forward pass: "heart" where the model draws it, and "jsrt" (the
    # visible lungs the cardiothoracic ratio is measured on) where the run's convention is another
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def pooled_features(deepest: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) deepest encoder map -> (N, 4C): 2x2 average pooling keeps the coarse layout (left/right,
    top/bottom) that tells a frontal CXR from a lateral one; the square root evens out activation scales."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(deepest.float(), 2)
    return pooled.clamp_min(0).sqrt().flatten(1)


class Segmenter:
    """Loads weights once; `prepare` maps (H, W) images to model inputs, `predict` runs a batch.

    Pre-processing (input size, mean/std, channels) comes only from the model's config; the quality model
    (input gate and est_dice) from the same config and weights file, when the model was calibrated for the
    `convention` (the output channel) asked for.
    """

    def __init__(self, weights: str | Path | None, device: torch.device, convention: str = defaults.CONVENTION,
                 precision: str = "auto", prepare_on_device: bool | None = None, decode_jpeg_on_device: bool | None = None):
        if device.type == "cpu":
            tune_malloc()
        self.device = device
        self.autocast = autocast_dtype(precision, device)  # None: fp32
        self.precision = precision_name(self.autocast)
        loaded = load_bundle(weights, device)
        self.config, self.weights_sha256 = loaded.config, loaded.sha256
        self.convention = convention
        self.output = self.config.output_index(convention)  # the output channel that draws this convention
        self.extra_outputs = _extra_outputs(self.config, convention)
        self.model = loaded.model.to(memory_format=torch.channels_last)
        self.weights_path = str(weights) if weights else "bundled default"
        self.quality = None
        if self.config.quality and calibrated_for(self.config.quality, convention):
            try:
                self.quality = QualityModel.from_config(self.config.quality, loaded.quality_tensors, convention)
            except (KeyError, ValueError, TypeError) as err:
                raise WeightsError(f"the quality statistics stored with {loaded.path} are unusable: {err}") from err
        # with CUDA (unless said otherwise) the native image is resized and normalised on the device, and gray
        # JPEGs decoded there
        on_cuda = device.type == "cuda"
        self.prepares_on_device = on_cuda if prepare_on_device is None else prepare_on_device and on_cuda
        self.decodes_jpeg_on_device = on_cuda if decode_jpeg_on_device is None else decode_jpeg_on_device and on_cuda
        self.max_batch: int | None = None  # set when CUDA ran out of memory
        self.oom_batches: list[int] = []  # the batch sizes that ran out of memory
        self._deepest: torch.Tensor | None = None
        self.model.encoder.register_forward_hook(self._keep_deepest)

    def _keep_deepest(self, module, inputs, outputs) -> None:
        self._deepest = outputs[-1]

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """(H, W) -> (C, S, S) float32 on the host (the CPU path; `prepare_on_device` does it on a GPU)."""
        c = self.config
        return prepare_input(pixels, c.input_size, c.mean, c.std, c.in_channels)

    def predict(self, batch: np.ndarray, pad_to: int | None = None) -> np.ndarray:
        """(N, C, S, S) float32 -> (N, S, S) float32 probabilities."""
        return self.predict_batch(batch, pad_to).probabilities

    def predict_batch(self, batch, pad_to: int | None = None, tta: bool = False) -> BatchPrediction:
        return self.start(batch, pad_to, tta)()

    def start(self, inputs, pad_to: int | None = None, tta: bool = False) -> Callable[[], BatchPrediction]:
        """Launch the model on a batch; the returned call waits for it and gives the probabilities, the pooled
        encoder features of the same forward pass and, with `tta`, a mirrored pass. On a GPU the work is queued
        and the call returns at once, so the host prepares the next batch meanwhile.

        `inputs`: host-prepared (C, S, S) arrays, or native (H, W) images when `prepares_on_device`. `pad_to`
        zero-pads a short batch: CPU kernels differ by batch size at the 1e-6 level, so a fixed batch size
        keeps masks byte-identical however a run was interrupted, resumed or sharded. A CUDA out-of-memory
        error halves the batch and tries again (from then on for the whole run; no image is lost).
        """
        launched, i = [], 0
        while i < len(inputs):
            size = min(len(inputs) - i, self.max_batch or len(inputs))
            pad = min(pad_to, self.max_batch or pad_to) if pad_to else None
            try:
                launched.append(self._launch(inputs[i:i + size], pad, tta))
            except torch.OutOfMemoryError:
                if size == 1:
                    raise
                self._shrink(size)
                continue
            i += size
        return lambda: _concatenate([wait() for wait in launched])

    def _shrink(self, size: int) -> None:
        self.max_batch = max(1, size // 2)
        self.oom_batches.append(size)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def _launch(self, inputs, pad_to: int | None, tta: bool) -> Callable[[], BatchPrediction]:
        n = len(inputs)
        x = self._device_batch(inputs)
        if pad_to and n < pad_to:
            x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
        x = x.contiguous(memory_format=torch.channels_last)
        channels = self._forward(x)[:n]
        probs, extra = channels[:, 0], channels[:, 1:]
        pooled = pooled_features(self._deepest[:n])
        flipped = self._forward(x.flip(-1))[:, 0].flip(-1)[:n] if tta else None
        host = [t if t is None else t.to("cpu", non_blocking=True) for t in (probs, pooled, flipped, extra)]
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()

        def wait() -> BatchPrediction:
            if done is not None:
                done.synchronize()
            probs, pooled, flipped, extra = (t if t is None else t.numpy() for t in host)
            return BatchPrediction(probs, pooled, flipped,
                                   {name: extra[:, i] for i, name in enumerate(self.extra_outputs)})

        return wait

    def _device_batch(self, inputs) -> torch.Tensor:
        if self.prepares_on_device:
            c = self.config
            return prepare_on_device(list(inputs), c.input_size, c.mean, c.std, c.in_channels, self.device)
        batch = torch.from_numpy(np.stack(inputs))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, 1 + E, S, S) probabilities: the run's lungs, then `extra_outputs`."""
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            logits = self.model(x)
        return torch.sigmoid(logits[:, [self.output, *self.extra_outputs.values()]].float())


def _extra_outputs(config, convention: str) -> dict[str, int]:
    """The output channels a run reads beside its lungs: the heart, and for the cardiothoracic ratio (measured on
    the visible lungs) the jsrt lungs when the run draws another convention. Empty for a model without a heart."""
    heart = config.structure_index("heart")
    if heart is None:
        return {}
    extra = {"heart": heart}
    if convention != "jsrt" and "jsrt" in config.conventions:
        extra["jsrt"] = config.output_index("jsrt")
    return extra


def _concatenate(parts: list[BatchPrediction]) -> BatchPrediction:
    if len(parts) == 1:
        return parts[0]
    flipped = None if parts[0].flipped is None else np.concatenate([p.flipped for p in parts])
    return BatchPrediction(np.concatenate([p.probabilities for p in parts]),
                           np.concatenate([p.pooled for p in parts]), flipped,
                           {k: np.concatenate([p.extra[k] for p in parts]) for k in parts[0].extra})


def oom_note(segmenter: Segmenter) -> str | None:
    """One line for the run's summary when CUDA ran out of memory (None if it never did)."""
    if not segmenter.oom_batches:
        return None
    return (f"CUDA ran out of memory {len(segmenter.oom_batches)} time(s) (first at a batch of "
            f"{segmenter.oom_batches[0]}); the run went on with batches of {segmenter.max_batch}, no image lost")

"""A loaded segmentation model that turns prepared batches into lung probabilities (and what quality needs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lungmask_kit import defaults
from lungmask_kit.errors import WeightsError
from lungmask_kit.imaging import prepare_input
from lungmask_kit.models.modeling import load_bundle
from lungmask_kit.quality import QualityModel, calibrated_for
from lungmask_kit.runtime import autocast_dtype, tune_malloc
from lungmask_kit.runtimes import RuntimeOutput, choose_runtime, runtime_precision
from lungmask_kit.runtimes.openvino import OpenVinoRuntime  # imports openvino only when one is built
from lungmask_kit.runtimes.torch import TorchRuntime


@dataclass
class BatchPrediction:
    probabilities: np.ndarray  # (N, S, S) float32: the lungs in the run's convention
    pooled: np.ndarray | None = None  # (N, D) float32: the encoder summary the input gate scores
    flipped: np.ndarray | None = None  # (N, S, S) probabilities of the mirrored input, mirrored back (--tta)
    # (N, S, S) float32 each, from the same forward pass: "heart" where the model draws it, and "jsrt" (the
    # visible lungs the cardiothoracic ratio is measured on) where the run's convention is another
    extra: dict[str, np.ndarray] = field(default_factory=dict)


class Segmenter:
    """Loads weights once; `prepare` maps (H, W) images to model inputs, `predict` runs a batch on the runtime.

    Pre-processing (input size, mean/std, channels) comes only from the model's config; the quality model
    (input gate and est_dice) from the same config and weights file, when the model was calibrated for the
    `convention` (the output channel) asked for. `runtime`: "torch", "openvino" or "auto" (`runtimes.choose_runtime`).
    """

    def __init__(self, weights: str | Path | None, device: torch.device, convention: str = defaults.CONVENTION,
                 precision: str = "auto", prepare_on_device: bool | None = None, decode_jpeg_on_device: bool | None = None,
                 runtime: str = "torch"):
        if device.type == "cpu":
            tune_malloc()
        self.device = device
        loaded = load_bundle(weights, device)
        self.config, self.weights_sha256 = loaded.config, loaded.sha256
        self.convention = convention
        self.extra_outputs = _extra_outputs(self.config, convention)
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
        # the run's lungs first, then `extra_outputs`
        channels = [self.config.output_index(convention), *self.extra_outputs.values()]
        self.runtime = _make_runtime(choose_runtime(runtime, device.type, precision), loaded, device, precision,
                                     channels, self.prepares_on_device)
        self.precision = self.runtime.precision
        self.model = loaded.model  # the torch network itself (benchmarks time it without the runtime)
        self.max_batch: int | None = None  # set when CUDA ran out of memory
        self.oom_batches: list[int] = []  # the batch sizes that ran out of memory

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
                launched.append(self.runtime.launch(inputs[i:i + size], pad, tta))
            except self.runtime.out_of_memory:
                if size == 1:
                    raise
                self.max_batch = max(1, size // 2)
                self.oom_batches.append(size)
                self.runtime.release_memory()
                continue
            i += size
        return lambda: _concatenate([self._named(wait()) for wait in launched])

    def _named(self, out: RuntimeOutput) -> BatchPrediction:
        return BatchPrediction(out.channels[:, 0], out.pooled, out.flipped,
                               {name: out.channels[:, 1 + i] for i, name in enumerate(self.extra_outputs)})


def _make_runtime(name: str, loaded, device: torch.device, precision: str, channels: list[int], on_device: bool):
    c = loaded.config
    if name == "openvino":

        return OpenVinoRuntime(loaded.model, c.in_channels, c.input_size, loaded.sha256, channels,
                               runtime_precision(name, precision, device.type))
    prepare = (c.input_size, c.mean, c.std, c.in_channels) if on_device else None
    return TorchRuntime(loaded.model, device, autocast_dtype(precision, device), channels, prepare)


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

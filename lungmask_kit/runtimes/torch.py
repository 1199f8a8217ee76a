"""The torch runtime: the network in eager PyTorch, channels_last, autocast to bf16 (CPU with bf16 units) or fp16
(CUDA) where the precision asks; on CUDA batches are queued so the host prepares the next one meanwhile."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from lungmask_kit.accel import prepare_on_device
from lungmask_kit.runtime import precision_name
from lungmask_kit.runtimes import RuntimeOutput


def pooled_features(deepest: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) deepest encoder map -> (N, 4C): 2x2 average pooling keeps the coarse layout (left/right,
    top/bottom) that tells a frontal CXR from a lateral one; the square root evens out activation scales."""
    pooled = torch.nn.functional.adaptive_avg_pool2d(deepest.float(), 2)
    return pooled.clamp_min(0).sqrt().flatten(1)


class TorchRuntime:
    """`model` (an smp segmentation model in eval mode) on `device`; computes the sigmoid of `channels`.

    `prepare`: (size, mean, std, in_channels) when the inputs are native (H, W) images to resize and normalise on
    the device (CUDA), None when they arrive prepared (C, S, S) from the host.
    """

    name = "torch"
    out_of_memory = (torch.OutOfMemoryError,)

    def __init__(self, model: torch.nn.Module, device: torch.device, autocast: torch.dtype | None,
                 channels: list[int], prepare: tuple | None = None):
        self.model = model.to(memory_format=torch.channels_last)
        self.device, self.autocast, self.channels, self.prepare = device, autocast, channels, prepare
        self.precision = precision_name(autocast)
        self._deepest: torch.Tensor | None = None
        self.model.encoder.register_forward_hook(self._keep_deepest)

    def _keep_deepest(self, module, inputs, outputs) -> None:
        self._deepest = outputs[-1]

    @torch.inference_mode()
    def launch(self, inputs, pad_to: int | None, tta: bool) -> Callable[[], RuntimeOutput]:
        n = len(inputs)
        x = self._device_batch(inputs)
        if pad_to and n < pad_to:
            x = torch.cat([x, x.new_zeros((pad_to - n, *x.shape[1:]))])
        x = x.contiguous(memory_format=torch.channels_last)
        channels = self._forward(x)[:n]
        pooled = pooled_features(self._deepest[:n])
        flipped = self._forward(x.flip(-1))[:, 0].flip(-1)[:n] if tta else None
        host = [t if t is None else t.to("cpu", non_blocking=True) for t in (channels, pooled, flipped)]
        done = None
        if self.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()

        def wait() -> RuntimeOutput:
            if done is not None:
                done.synchronize()
            return RuntimeOutput(*(t if t is None else t.numpy() for t in host))

        return wait

    def release_memory(self) -> None:
        """After an out-of-memory error: give the allocator's cached blocks back before a smaller batch."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _device_batch(self, inputs) -> torch.Tensor:
        if self.prepare:
            return prepare_on_device(list(inputs), *self.prepare, self.device)
        batch = torch.from_numpy(np.stack(inputs))
        if self.device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, S, S) -> (N, K, S, S) probabilities of `channels`."""
        with torch.autocast(self.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None):
            logits = self.model(x)
        return torch.sigmoid(logits[:, self.channels].float())

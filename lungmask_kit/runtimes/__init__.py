"""What runs the network: one protocol, a torch runtime and an OpenVINO one, and the choice between them.

A runtime takes prepared batches (N, C, S, S) and gives, per image, the probabilities of the output channels it
was built for and the pooled encoder features the input gate scores. It knows nothing of images, masks or
manifests; `inference.Segmenter` turns a model bundle and a convention into the channels a runtime computes.
Which runtime `auto` picks (measured: README, `lungkit segment`, `--runtime`): torch on a GPU and on a CPU with
bf16 units (bf16 there beats any fp32), OpenVINO f32 on a CPU without them, where it outruns torch fp32 with the
same masks.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np

from lungmask_kit import runtime as host
from lungmask_kit.errors import LungkitError

RUNTIMES = ("torch", "openvino")


@dataclass
class RuntimeOutput:
    channels: np.ndarray  # (N, K, S, S) float32 probabilities, one per channel the runtime was built for
    pooled: np.ndarray  # (N, D) float32 pooled encoder features (`pooled_features`)
    flipped: np.ndarray | None = None  # (N, S, S) the first channel of the mirrored input, mirrored back (tta)


class Runtime(Protocol):
    name: str  # "torch" | "openvino": the manifest's `backend`
    precision: str  # "fp32" | "bf16" | "fp16": what the network computes in
    out_of_memory: tuple[type[BaseException], ...]  # errors after which a smaller batch may succeed

    def launch(self, inputs, pad_to: int | None, tta: bool) -> Callable[[], RuntimeOutput]:
        """Start a batch; the returned call waits for it. `pad_to` zero-pads a short batch (fixed batch sizes keep
        CPU results byte-identical however a run is cut)."""
        ...


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def choose_runtime(requested: str, device_type: str, precision: str) -> str:
    """`--runtime` -> the runtime that runs: `auto` is torch on a GPU, on a CPU with bf16 units and for
    `--precision bf16`; OpenVINO elsewhere where it is installed. A runtime that cannot run here is refused."""
    if requested not in ("auto", *RUNTIMES):
        raise LungkitError(f"unknown runtime {requested!r} (use auto, {', '.join(RUNTIMES)})")
    if requested == "auto":
        cpu_fp32 = device_type == "cpu" and precision in ("auto", "fp32") and not host.cpu_has_bf16()
        return "openvino" if cpu_fp32 and openvino_installed() else "torch"
    if requested == "openvino":
        if device_type != "cpu":
            raise LungkitError("--runtime openvino runs the model on the CPU: add --device cpu, or use --runtime torch")
        if not openvino_installed():
            raise LungkitError("--runtime openvino needs OpenVINO: pip install openvino")
        if precision == "bf16" and not host.cpu_has_bf16():
            raise LungkitError("--precision bf16: this CPU has no bf16 units (AVX512-BF16 or AMX); use fp32")
    return requested


def runtime_precision(runtime: str, precision: str, device_type: str) -> str:
    """The precision a runtime computes in for a `--precision` setting, by name ("fp32", "bf16", "fp16")."""
    if runtime == "openvino":
        return "bf16" if precision == "bf16" else "fp32"  # auto: f32, the masks torch fp32 draws
    import torch

    return host.precision_name(host.autocast_dtype(precision, torch.device(device_type)))

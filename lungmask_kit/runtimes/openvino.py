"""The OpenVINO runtime (CPU): the network converted once per weights file to OpenVINO IR, cached under the user's
cache folder keyed by the weights' sha256, and compiled for this CPU at f32 (or bf16 on a CPU with bf16 units).

On a CPU without bf16 units it outruns torch fp32 with the same masks (README, `lungkit segment`, `--runtime`).
OpenVINO's Python package sends a usage event to Intel on import unless told otherwise; lungkit imports it with
that switched off (`import_openvino`): a tool run beside patient images does not phone home.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lungmask_kit.runtimes import RuntimeOutput
from lungmask_kit.runtimes.torch import pooled_features

CACHE_FORMAT = "lungkit-ov/1"  # bump when the converted graph changes (its outputs, their order)
_HINTS = {"fp32": "f32", "bf16": "bf16"}


def import_openvino():
    """`openvino` with its telemetry off: with the `openvino_telemetry` module unavailable, OpenVINO uses its own
    no-op stub (its code path for installs without that package). A process that imported it already keeps it."""
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None: `import openvino_telemetry` raises ImportError
    import openvino

    return openvino


def cache_root() -> Path | None:
    """LUNGKIT_CACHE_DIR, else $XDG_CACHE_HOME/lungkit, else ~/.cache/lungkit; None where there is no home."""
    if os.environ.get("LUNGKIT_CACHE_DIR"):
        return Path(os.environ["LUNGKIT_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "lungkit"
    try:
        return Path.home() / ".cache" / "lungkit"
    except RuntimeError:  # no HOME and no passwd entry (some containers): convert on every run
        return None


class _Network(torch.nn.Module):
    """What is converted: every output channel's probability and the pooled encoder features, as the torch
    runtime computes them (smp's forward, written out so the deepest encoder map is an output)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.encoder(x)
        logits = self.model.segmentation_head(self.model.decoder(features))
        return torch.sigmoid(logits), pooled_features(features[-1])


def convert(model: torch.nn.Module, in_channels: int, size: int):
    """The torch model -> an `openvino.Model` taking (N, in_channels, size, size), any N. Through OpenVINO's
    PyTorch frontend (a TorchScript trace); `openvino.convert_model` would send telemetry."""
    ov = import_openvino()
    from openvino.frontend import FrontEndManager
    from openvino.frontend.pytorch.ts_decoder import TorchScriptPythonDecoder

    example = torch.zeros((1, in_channels, size, size))
    with warnings.catch_warnings(), torch.no_grad():
        # the trace's own notices (torch.jit.trace deprecated, data-dependent shape checks in smp's decoder that
        # are constant for one input size): the converted model is checked against torch by the tests
        warnings.simplefilter("ignore")
        decoder = TorchScriptPythonDecoder(_Network(model).eval(), example_input=(example,))
        frontend = FrontEndManager().load_by_framework("pytorch")
        converted = frontend.convert(frontend.load(decoder))
    converted.reshape({converted.inputs[0]: ov.PartialShape([-1, in_channels, size, size])})
    return converted


def cached_model(model: torch.nn.Module, in_channels: int, size: int, weights_sha256: str):
    """The converted model from the cache, converting (and storing) it the first time. A damaged cache entry is
    converted again; an unwritable cache folder only costs the conversion on every run."""
    ov = import_openvino()
    root = cache_root()
    if root is None:
        return convert(model, in_channels, size)
    version = ov.get_version().split("-")[0]
    entry = root / "openvino" / f"{weights_sha256[:32]}-{in_channels}x{size}-{CACHE_FORMAT.replace('/', '')}-{version}"
    xml = entry / "model.xml"
    if xml.is_file():
        try:
            return ov.Core().read_model(str(xml))
        except RuntimeError:
            shutil.rmtree(entry, ignore_errors=True)
    converted = convert(model, in_channels, size)
    try:
        _store(ov, converted, entry)
    except OSError:
        pass
    return converted


def _store(ov, converted, entry: Path) -> None:
    """Write the IR into a new folder beside `entry` and rename it into place: a reader never sees half a model;
    when two runs convert at once, the first rename wins and the other's copy is dropped."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private; the cache follows the user's umask like the rest
        ov.save_model(converted, str(tmp / "model.xml"), compress_to_fp16=False)
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / "model.xml").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OpenVinoRuntime:
    """The network on this CPU through OpenVINO; computes `channels` (indices into the model's output channels)."""

    name = "openvino"
    out_of_memory: tuple[type[BaseException], ...] = ()

    def __init__(self, model: torch.nn.Module, in_channels: int, size: int, weights_sha256: str, channels: list[int],
                 precision: str = "fp32", threads: int | None = None):
        ov = import_openvino()
        self.channels, self.precision = channels, precision
        self.shape = (in_channels, size, size)
        config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY",
                  "INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
        compiled = ov.Core().compile_model(cached_model(model, in_channels, size, weights_sha256), "CPU", config)
        self._request = compiled.create_infer_request()

    def launch(self, inputs, pad_to: int | None, tta: bool) -> Callable[[], RuntimeOutput]:
        n = len(inputs)
        x = np.zeros((max(n, pad_to or 0), *self.shape), np.float32)
        x[:n] = np.stack(inputs)
        probabilities, pooled = self._infer(x)
        out = RuntimeOutput(probabilities[:n, self.channels], pooled[:n])
        if tta:
            mirrored = self._infer(np.ascontiguousarray(x[..., ::-1]))[0]
            out.flipped = np.ascontiguousarray(mirrored[:n, self.channels[0], :, ::-1])
        return lambda: out

    def _infer(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = self._request.infer({0: x}, share_outputs=False)  # copies: the next call reuses the buffers
        return result[0], result[1]

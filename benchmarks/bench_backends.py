#!/usr/bin/env python
"""Model-only throughput of the bundled segmenter under each CPU runtime lungkit could use, and how far each
one's masks are from torch fp32: torch fp32, torch bf16 autocast (what `segment --precision auto` uses on a CPU
with bf16 units), OpenVINO f32 and bf16 (converted from the torch model at load), ONNX Runtime fp32.

A runtime is worth shipping only if it beats torch bf16 clearly end to end; `segment` is I/O-bound on small
machines (bench_segment.py), so a model-only gain is an upper bound on what it would give there.

Inputs: the bundled example CXRs (and their mirror images, shifted) at the model's input size, batch 16,
`--threads` threads for every runtime. Runtimes that are not installed are skipped and said so.

Usage: python benchmarks/bench_backends.py [--n 64] [--batch-size 16] [--threads 2] [--repeats 3] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lungmask_kit.imaging import read_gray  # noqa: E402
from lungmask_kit.inference import Segmenter  # noqa: E402
from lungmask_kit.metrics import dice  # noqa: E402
from lungmask_kit.runtime import cpu_has_bf16, tune_malloc  # noqa: E402


def inputs(segmenter: Segmenter, n: int) -> np.ndarray:
    bases = [read_gray(p) for p in sorted((REPO / "examples" / "cxr-sample" / "images").glob("*.png"))]
    images = []
    for i in range(n):
        img = bases[i % len(bases)]
        if (i // len(bases)) % 2:
            img = cv2.flip(img, 1)
        images.append(np.roll(img, 3 * (i // (2 * len(bases))), axis=0))
    return np.stack([segmenter.prepare(im) for im in images]).astype(np.float32)


def timed(run, batches: list[np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    """(images per second, best of `repeats`; the probabilities of the last pass)."""
    run(batches[0])  # warm-up (graph compilation, allocator)
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = np.concatenate([run(b) for b in batches])
        best = min(best, time.perf_counter() - t0)
    return sum(len(b) for b in batches) / best, out


def torch_runner(segmenter: Segmenter, dtype: torch.dtype | None):
    model = segmenter.model.eval()

    @torch.inference_mode()
    def run(batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        return torch.sigmoid(logits[:, segmenter.config.output_index(segmenter.convention)].float()).numpy()

    return run


def openvino_runner(segmenter: Segmenter, precision: str, threads: int, example: np.ndarray):
    """lungkit's own OpenVINO runtime (converted through OpenVINO's PyTorch frontend, telemetry off, cached)."""
    from lungmask_kit.runtimes.openvino import OpenVinoRuntime

    c = segmenter.config
    runtime = OpenVinoRuntime(segmenter.model.eval().float(), c.in_channels, c.input_size, segmenter.weights_sha256,
                              [c.output_index(segmenter.convention)], {"f32": "fp32", "bf16": "bf16"}[precision], threads)

    def run(batch: np.ndarray) -> np.ndarray:
        return runtime.launch(list(batch), None, False)().channels[:, 0]

    return run


def onnxruntime_runner(segmenter: Segmenter, threads: int, example: np.ndarray):
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "model.onnx"
    torch.onnx.export(segmenter.model.eval().float(), torch.from_numpy(example), str(path), input_names=["x"],
                      output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}}, dynamo=False)
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(batch: np.ndarray) -> np.ndarray:
        logits = session.run(None, {"x": batch})[0]
        return 1 / (1 + np.exp(-logits[:, segmenter.config.output_index(segmenter.convention)].astype(np.float32)))

    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    tune_malloc()
    torch.set_num_threads(args.threads)
    segmenter = Segmenter(None, torch.device("cpu"), precision="fp32")
    x = inputs(segmenter, args.n)
    batches = [x[k:k + args.batch_size] for k in range(0, len(x), args.batch_size)]
    runners = {"torch fp32": lambda: torch_runner(segmenter, None)}
    if cpu_has_bf16():
        runners["torch bf16 autocast"] = lambda: torch_runner(segmenter, torch.bfloat16)
    runners["openvino f32"] = lambda: openvino_runner(segmenter, "f32", args.threads, batches[0])
    runners["openvino bf16"] = lambda: openvino_runner(segmenter, "bf16", args.threads, batches[0])
    runners["onnxruntime fp32"] = lambda: onnxruntime_runner(segmenter, args.threads, batches[0])
    results, reference = {}, None
    for name, make in runners.items():
        try:
            rate, probs = timed(make(), batches, args.repeats)
        except ImportError as err:
            results[name] = {"skipped": f"not installed ({err.name})"}
            print(f"{name:22s} skipped: not installed ({err.name})")
            continue
        masks = probs >= 0.5
        if reference is None:
            reference = masks
        agreement = [dice(a, b) for a, b in zip(masks, reference)]
        results[name] = {"img_per_s": round(rate, 2), "dice_vs_fp32_mean": round(float(np.mean(agreement)), 5),
                         "dice_vs_fp32_min": round(float(np.min(agreement)), 5)}
        print(f"{name:22s} {rate:6.2f} img/s  x{rate / results['torch fp32']['img_per_s']:.2f}  "
              f"mask Dice vs fp32 mean {np.mean(agreement):.4f} min {np.min(agreement):.4f}")
    report = {"machine": platform.processor() or platform.machine(), "cpu_bf16": cpu_has_bf16(), "threads": args.threads,
              "batch_size": args.batch_size, "n": args.n, "torch": torch.__version__, "results": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "backends.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(main())

#!/usr/bin/env python
"""End-to-end `lungkit segment` throughput of two configurations, interleaved round by round.

On a shared 2-core machine one bench_segment.py run of either can move by 10% from the next; alternating them
(A, B, A, B, ...) on the same inputs and comparing each round's pair cancels most of that drift. Reports each
round's images/s (pipeline time: model loading excluded) and the per-round ratio B/A with its median.

Usage: python benchmarks/bench_ab.py [--a-weights OLD] [--b-weights NEW] [--rounds 8] [--n 48]
       [--b-heart-png] [--precision auto] [--a-precision P] [--b-precision P] [--a-runtime R] [--b-runtime R]
Examples: the heart's cost (issue 31): --a-weights the model before the heart, B the bundled model;
the runtimes (issue 32): --a-runtime torch --a-precision fp32 --b-runtime openvino.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_segment import make_inputs  # noqa: E402
from lungmask_kit.segment import SegmentOptions, run_segment  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a-weights", default=None, help="default: the bundled model")
    ap.add_argument("--b-weights", default=None, help="default: the bundled model")
    ap.add_argument("--b-heart-png", action="store_true", help="B also writes heart PNGs (segment --heart-png)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    for side in ("a", "b"):
        ap.add_argument(f"--{side}-precision", default=None, choices=["auto", "fp32", "bf16"], help="default: --precision")
        ap.add_argument(f"--{side}-runtime", default="auto", choices=["auto", "torch", "openvino"])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lungkit-ab-"))
    try:
        src = make_inputs(root / "in", args.n, "example", 1024, "png")
        configs = {"A": SegmentOptions(weights=args.a_weights, precision=args.a_precision or args.precision,
                                       runtime=args.a_runtime, progress=False),
                   "B": SegmentOptions(weights=args.b_weights, precision=args.b_precision or args.precision,
                                       runtime=args.b_runtime, heart_png=args.b_heart_png, progress=False)}
        rates: dict[str, list[float]] = {"A": [], "B": []}
        for k in range(args.rounds):
            for name, options in configs.items():
                out = root / f"out-{name}-{k}"
                s = run_segment(src, out, options)
                rates[name].append(s.processed / s.pipeline_seconds)
                shutil.rmtree(out)
        ratios = [b / a for a, b in zip(rates["A"], rates["B"])]
        for name in rates:
            print(f"{name} img/s  " + " ".join(f"{r:.2f}" for r in rates[name]) + f"  mean {statistics.mean(rates[name]):.2f}")
        print("B/A per round " + " ".join(f"{r:.3f}" for r in ratios) + f"  median {statistics.median(ratios):.3f}"
              f"  (mean of rates {statistics.mean(rates['B']) / statistics.mean(rates['A']):.3f})")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

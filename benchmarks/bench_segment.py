#!/usr/bin/env python
"""Throughput and memory benchmark of `lungkit segment` against its own limits, measured in one run.

Reports (JSON + table):
  (a) model-only img/s      pre-made input tensors, same batch size and device, best settings
                            (channels_last, tuned allocator) -- the model's ceiling
  (b) I/O-only img/s        the segment pipeline with the model replaced by a fixed probability map:
                            read, hash, decode, resize, post-process, derive, encode and write 3 PNGs
  (c) end-to-end img/s      `lungkit segment` (run_segment) as users run it
  (d) naive loop img/s      the published code's shape: one image at a time, batch of one, eager model,
                            skimage post-processing at full size, sequential writes
  (e) peak RSS              of `lungkit segment` subprocesses on N and 10N images
  on CUDA also: peak GPU memory of the end-to-end run and, for JPEG, how far nvJPEG's pixels are from libjpeg's

Targets (issue 6): CPU e2e >= 85% of 1/(1/a + 1/b) and >= 1.5x naive; GPU e2e >= 80% of min(a, b) and >= 10x
naive; RSS(10N) <= 1.1 x RSS(N) and < 3 GB.

Runs as `lungkit segment` does, OpenMP threads passive (OMP_WAIT_POLICY=PASSIVE unless set: the model alone is
5-8% slower, the run faster); OMP_WAIT_POLICY=ACTIVE measures the other way.

Usage: python benchmarks/bench_segment.py [--n 48] [--source example|synthetic] [--size 1024]
       [--format png|jpg] [--batch-size 16] [--device auto] [--precision auto|fp32|bf16]
       [--runtime auto|torch|openvino] [--weights PATH] [--out benchmarks/results]

A run that is not torch fp32 (bf16, fp16, OpenVINO) is also run end to end as `--runtime torch --precision fp32`
in the same process: the speed-up over it and how far its masks move (Dice mean and min).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lungmask_kit.runtime import passive_openmp_threads  # noqa: E402

passive_openmp_threads()  # as `lungkit segment` runs (before torch loads); the model-only figure is under it too

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lungmask_kit.imaging import read_gray  # noqa: E402
from lungmask_kit.inference import Segmenter  # noqa: E402
from lungmask_kit.runtime import configure_threads, resolve_device, tune_malloc  # noqa: E402


def make_inputs(root: Path, n: int, source: str, size: int, fmt: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if source == "example":
        bases = [read_gray(p) for p in sorted((REPO / "examples" / "cxr-sample" / "images").glob("*.png"))]
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import cxr_like

        bases = [cxr_like(size, int(size * 0.9), seed=i) for i in range(8)]
    for i in range(n):
        img = bases[i % len(bases)]
        ext = ".jpg" if fmt == "jpg" else ".png"
        # a one-pixel change per copy keeps every file's sha256 distinct
        img = img.copy()
        img.flat[i % img.size] ^= 1
        cv2.imwrite(str(root / f"img{i:05d}{ext}"), img, [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else [])
    return root


def model_only(seg: Segmenter, n: int, batch: int) -> float:
    c = seg.config
    x = np.random.default_rng(0).standard_normal((batch, c.in_channels, c.input_size, c.input_size)).astype(np.float32)
    seg.predict(x)  # warm-up
    if seg.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    done = 0
    while done < n:
        seg.predict(x)
        done += batch
    if seg.device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - t)


def pipeline(src: Path, out: Path, args, fixed_probability: bool, precision: str | None = None,
             runtime: str | None = None) -> float:
    import lungmask_kit.segment as seg_mod
    from lungmask_kit.inference import Segmenter as RealSegmenter

    shutil.rmtree(out, ignore_errors=True)
    opts = seg_mod.SegmentOptions(weights=args.weights, device=args.device, batch_size=args.batch_size,
                                  workers=args.workers, progress=False, min_lung_fraction=0.0,
                                  precision=precision or args.precision, runtime=runtime or args.runtime)
    if fixed_probability:
        size = 256
        yy, xx = np.mgrid[0:size, 0:size]
        prob = np.zeros((size, size), np.float32)
        for cx in (0.3 * size, 0.7 * size):
            prob[((xx - cx) / (0.16 * size)) ** 2 + ((yy - 0.5 * size) / (0.32 * size)) ** 2 < 1] = 0.9

        from lungmask_kit.inference import BatchPrediction

        class NoModel(RealSegmenter):
            # the quality model (gate, est_dice) still runs on the writer threads, on zero features
            def start(self, inputs, pad_to=None, tta=False):
                gate = self.quality and (self.quality.view or self.quality.image)
                dim = gate.mean.shape[0] if gate else 1
                n = len(inputs)
                return lambda: BatchPrediction(np.broadcast_to(prob, (n, size, size)), np.zeros((n, dim), np.float32))

        seg_mod_segmenter = NoModel
    else:
        seg_mod_segmenter = RealSegmenter
    import lungmask_kit.segment.run as job  # the job loads its model through this name

    saved = job.Segmenter
    job.Segmenter = seg_mod_segmenter
    try:
        s = seg_mod.run_segment(src, out, opts)
    finally:
        job.Segmenter = saved
    assert s.failed == 0, s.errors[:3]
    return s.processed / s.pipeline_seconds  # model loading excluded: it is paid once per run


def nvjpeg_difference(src: Path, device: torch.device) -> int:
    """Largest grey-level difference between nvJPEG's and OpenCV's (libjpeg-turbo) decode of the inputs."""
    from lungmask_kit.accel import decode_jpegs
    from lungmask_kit.imaging import decode_image

    datas = [p.read_bytes() for p in sorted(src.iterdir())[:32]]
    worst = 0
    for data, t in zip(datas, decode_jpegs(datas, device)):
        if t is not None:
            worst = max(worst, int(np.abs(t.cpu().numpy().astype(int) - decode_image(data).pixels).max()))
    return worst


def cpu_kind() -> str:
    """The CPU's model name and the units that decide the runtime (bf16: AVX512-BF16, AMX; else AVX2/AVX512)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    units = [u for u in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if u in flags]
    return f"{name}: {' '.join(units) or 'no AVX2'}"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def mask_agreement(a: Path, b: Path) -> tuple[float, float]:
    """(mean, min) Dice between the masks of two runs over the same images."""
    from lungmask_kit.metrics import dice

    scores = [dice(cv2.imread(str(f), 0) > 0, cv2.imread(str(b / "masks" / f.name), 0) > 0)
              for f in sorted((a / "masks").iterdir())]
    return float(np.mean(scores)), float(np.min(scores))


def naive_loop(src: Path, out: Path, seg: Segmenter) -> float:
    """The published code's shape: per image read -> resize -> model(batch 1) -> skimage at full size -> 3 writes."""
    from skimage import morphology

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    model = seg.model.to(memory_format=torch.contiguous_format)
    c = seg.config
    files = sorted(src.iterdir())
    t = time.perf_counter()
    for f in files:
        img = cv2.imread(str(f), cv2.IMREAD_GRAYSCALE)
        x = (cv2.resize(img, (c.input_size, c.input_size)).astype(np.float32) / 255 - c.mean[0]) / c.std[0]
        with torch.no_grad():
            prob = torch.sigmoid(model(torch.from_numpy(x)[None, None].to(seg.device)))[0, 0].cpu().numpy()
        mask = cv2.resize(prob, (img.shape[1], img.shape[0])) > 0.5
        area = mask.size
        mask = morphology.remove_small_objects(mask, max_size=int(0.005 * area))
        mask = morphology.remove_small_holes(mask, max_size=int(0.005 * area))
        cv2.imwrite(str(out / f"{f.stem}_mask.png"), mask.astype(np.uint8) * 255)
        cv2.imwrite(str(out / f"{f.stem}_lungs.png"), np.where(mask, img, 0))
        cv2.imwrite(str(out / f"{f.stem}_nolungs.png"), np.where(mask, 0, img))
    rate = len(files) / (time.perf_counter() - t)
    seg.model.to(memory_format=torch.channels_last)
    return rate


def peak_rss(src: Path, out: Path, args) -> tuple[float, float]:
    """(peak RSS MiB, img/s) of `lungkit segment` in a fresh process."""
    shutil.rmtree(out, ignore_errors=True)
    code = (
        "import resource, sys, time; from lungmask_kit.cli.app import main; t = time.perf_counter(); "
        "rc = main(sys.argv[1:]); dt = time.perf_counter() - t; "
        "print('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, dt); sys.exit(rc)"
    )
    cmd = [sys.executable, "-c", code, "segment", str(src), "-o", str(out), "-b", str(args.batch_size),
           "--device", args.device, "-j", str(args.workers), "-q", "--min-lung-fraction", "0",
           "--precision", args.precision, "--runtime", args.runtime]
    if args.weights:
        cmd += ["-w", str(args.weights)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    line = [ln for ln in res.stdout.splitlines() if ln.startswith("RSS")][-1].split()
    n = len(os.listdir(src))
    return float(line[1]), n / float(line[2])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=48)
    ap.add_argument("--source", choices=["example", "synthetic"], default="example")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--format", choices=["png", "jpg"], default="png")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--weights", default=None)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--runtime", default="auto", choices=["auto", "torch", "openvino"])
    ap.add_argument("--skip-rss", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    args.device = str(device)
    tune_malloc()
    threads = configure_threads()
    work = Path(tempfile.mkdtemp(prefix="lungkit-bench-"))
    try:
        src = make_inputs(work / "in", args.n, args.source, args.size, args.format)
        seg = Segmenter(args.weights, device, precision=args.precision, runtime=args.runtime)
        r = {"device": str(device), "precision": seg.precision, "runtime": seg.runtime.name, "cpu_flags": cpu_kind(), "card": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
             "cores": os.cpu_count(), "torch_threads": threads, "n": args.n, "source": args.source, "format": args.format,
             "batch_size": args.batch_size, "workers": args.workers, "torch": torch.__version__, "commit": git_commit()}
        r["model_only"] = model_only(seg, max(args.n, 4 * args.batch_size), args.batch_size)
        r["io_only"] = pipeline(src, work / "io", args, fixed_probability=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        r["end_to_end"] = pipeline(src, work / "e2e", args, fixed_probability=False)
        if device.type == "cuda":
            r["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            if args.format == "jpg":
                r["nvjpeg_max_abs_diff"] = nvjpeg_difference(src, device)
        if (seg.runtime.name, seg.precision) != ("torch", "fp32"):  # torch fp32: the speed-up, how far masks move
            r["end_to_end_fp32"] = pipeline(src, work / "e2e-fp32", args, fixed_probability=False, precision="fp32",
                                            runtime="torch")
            r["mask_dice_vs_fp32_mean"], r["mask_dice_vs_fp32_min"] = mask_agreement(work / "e2e", work / "e2e-fp32")
        r["naive"] = naive_loop(src, work / "naive", seg)
        r["bound_cpu"] = 1 / (1 / r["model_only"] + 1 / r["io_only"])
        r["bound_gpu"] = min(r["model_only"], r["io_only"])
        bound = r["bound_gpu"] if device.type == "cuda" else r["bound_cpu"]
        r["e2e_vs_bound"] = r["end_to_end"] / bound
        r["e2e_vs_naive"] = r["end_to_end"] / r["naive"]
        if not args.skip_rss:
            src10 = make_inputs(work / "in10", 10 * args.n, args.source, args.size, args.format)
            r["rss_n_mib"], _ = peak_rss(src, work / "rss1", args)
            r["rss_10n_mib"], r["e2e_10n_img_s"] = peak_rss(src10, work / "rss10", args)
            r["rss_ratio"] = r["rss_10n_mib"] / r["rss_n_mib"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{device.type}-{stamp}.json").write_text(json.dumps(r, indent=2))
    rows = [("device", f"{r['device']} ({r['card']}, {r['cpu_flags']}, {r['cores']} cores, {threads} torch threads)"),
            ("images", f"{args.n} x {args.source} {args.format} (10N = {10 * args.n})"),
            ("(a) model-only", f"{r['model_only']:.2f} img/s (batch {args.batch_size})"),
            ("(b) I/O-only", f"{r['io_only']:.2f} img/s"),
            ("(c) end-to-end", f"{r['end_to_end']:.2f} img/s, {r['runtime']} {r['precision']}"),
            ("(d) naive loop", f"{r['naive']:.2f} img/s"),
            ("bound", f"{bound:.2f} img/s ({'min(a, b)' if device.type == 'cuda' else '1/(1/a + 1/b)'})"),
            ("e2e / bound", f"{r['e2e_vs_bound']:.1%} (target {'80' if device.type == 'cuda' else '85'}%)"),
            ("e2e / naive", f"{r['e2e_vs_naive']:.2f}x (target {'10' if device.type == 'cuda' else '1.5'}x)")]
    if "end_to_end_fp32" in r:
        rows += [("e2e torch fp32", f"{r['end_to_end_fp32']:.2f} img/s ({r['end_to_end'] / r['end_to_end_fp32']:.2f}x with "
                  f"{r['runtime']} {r['precision']}; masks vs torch fp32 Dice mean {r['mask_dice_vs_fp32_mean']:.5f}, "
                  f"min {r['mask_dice_vs_fp32_min']:.5f})")]
    if "peak_gpu_mib" in r:
        rows += [("peak GPU memory", f"{r['peak_gpu_mib']:.0f} MiB (end-to-end run)")]
    if "nvjpeg_max_abs_diff" in r:
        rows += [("nvJPEG vs libjpeg", f"max {r['nvjpeg_max_abs_diff']} grey level(s) apart")]
    if "rss_ratio" in r:
        rows += [("peak RSS N / 10N", f"{r['rss_n_mib']:.0f} / {r['rss_10n_mib']:.0f} MiB (ratio {r['rss_ratio']:.3f}, target <= 1.1, < 3 GB)")]
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


if __name__ == "__main__":
    main()

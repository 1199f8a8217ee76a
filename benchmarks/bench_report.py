#!/usr/bin/env python
"""Time and peak memory of `lungkit report` on a large synthetic run, in a subprocess per size.

A fake segment run of N rows (default 100,000) is written: a manifest with realistic columns, `--flagged`
of the rows flagged (default 5%, spread over four QC reasons), and every image a hard link to one of a few
512 x 512 PNGs (so the disk holds a handful of files, while the report reads them as N distinct images). The
report then renders every flagged image plus the sampled sheets, exactly as on a real run.

Usage: python benchmarks/bench_report.py [--n 100000 10000] [--flagged 0.05] [--workers 0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REASONS = [
    "not like the frontal chest X-rays the model knows (image ood score 1.31 > max_ood_score 1)",
    "implausible lung shape for a frontal chest X-ray (shape ood score 4.2 > max_ood_score 1)",
    "low estimated Dice 0.852 < min_est_dice 0.88",
    "lung area fraction 0.0812 < min_lung_fraction 0.15",
]


def synthetic_cxr(seed: int, size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    lungs = np.zeros((size, size), bool)
    for cx in (0.3, 0.7):
        lungs |= ((xx - cx * size) / (0.15 * size)) ** 2 + ((yy - 0.5 * size) / (0.3 * size)) ** 2 < 1
    img = np.where(lungs, 70, 190) + rng.normal(0, 12, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8), lungs


def make_run(root: Path, n: int, flagged: float, seed: int = 0) -> Path:
    import cv2

    from lungmask_kit.manifest import SEGMENT_FIELDS, to_table, write_table

    src, out = root / "in", root / "out"
    (out / "masks").mkdir(parents=True)
    src.mkdir()
    for k in range(4):
        img, lungs = synthetic_cxr(k)
        cv2.imwrite(str(root / f"proto{k}.png"), img)
        cv2.imwrite(str(root / f"mask{k}.png"), lungs.astype(np.uint8) * 255)
    rng = np.random.default_rng(seed)
    is_flagged = rng.random(n) < flagged
    rows = []
    for i in range(n):
        k = i % 4
        rel = f"d{i // 1000:03d}/img{i:06d}.png"
        mask_rel = f"masks/{rel}"
        (src / rel).parent.mkdir(exist_ok=True)
        (out / mask_rel).parent.mkdir(exist_ok=True)
        os.link(root / f"proto{k}.png", src / rel)
        os.link(root / f"mask{k}.png", out / mask_rel)
        est = float(np.clip(rng.normal(0.95, 0.015), 0, 1))
        reason = "; ".join(rng.choice(REASONS, size=rng.integers(1, 3), replace=False)) if is_flagged[i] else None
        rows.append({"path": rel, "status": "ok", "width": 512, "height": 512, "bit_depth": 8, "source_channels": 1,
                     "mask_path": mask_rel, "lungs_path": f"lungs/{rel}", "nolungs_path": f"nolungs/{rel}",
                     "lung_area_fraction": float(rng.normal(0.33, 0.06)), "n_components": 2,
                     "ood_score": float(rng.lognormal(-1, 0.3)), "est_dice": est, "qc_pass": not is_flagged[i],
                     "qc_reason": reason, "label": "covid" if i % 3 else "negative", "split": "train"})
    meta = {"command": "segment", "input_root": "../in", "lungkit_version": "bench",
            "qc": {"min_lung_fraction": 0.15, "max_ood_score": 1.0, "min_est_dice": 0.88}}
    write_table(to_table(rows, SEGMENT_FIELDS, meta), out / "manifest.parquet")
    (out / ".lungkit-run.json").write_text(json.dumps({"command": "segment"}))
    return out


def timed_report(out: Path, workers: int) -> dict:
    code = (
        "import json, resource, sys, time; t = time.perf_counter();"
        "from lungmask_kit.report import ReportOptions, build_report;"
        f"s = build_report({str(out)!r}, {str(out / 'report')!r}, ReportOptions(workers={workers}, progress=False));"
        "print(json.dumps({'seconds': time.perf_counter() - t, 'pages': s.pages, 'overlays': s.images_shown,"
        "'flagged': s.flagged, 'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise SystemExit(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000])
    ap.add_argument("--flagged", type=float, default=0.05)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--keep", type=Path, help="build the runs here and keep them")
    args = ap.parse_args()
    results = []
    for n in args.n:
        root = Path(tempfile.mkdtemp(prefix=f"lungkit-bench-report-{n}-", dir=args.keep))
        t0 = time.perf_counter()
        out = make_run(root, n, args.flagged)
        made = time.perf_counter() - t0
        r = {"n": n, "flagged_fraction": args.flagged, "make_run_seconds": round(made, 1), **timed_report(out, args.workers)}
        r["seconds"] = round(r["seconds"], 1)
        r["overlays_per_second"] = round(r["overlays"] / r["seconds"], 1)
        results.append(r)
        print(json.dumps(r), flush=True)
        if args.keep is None:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    print(f"{'n':>8} {'overlays':>9} {'pages':>6} {'seconds':>8} {'overlays/s':>10} {'peak RSS MB':>12}")
    for r in results:
        print(f"{r['n']:>8} {r['overlays']:>9} {r['pages']:>6} {r['seconds']:>8} {r['overlays_per_second']:>10} {r['peak_rss_mb']:>12.0f}")


if __name__ == "__main__":
    main()

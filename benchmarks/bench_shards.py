#!/usr/bin/env python
"""Shards on one machine against one process on the same cores (issue 13's goal: >= 0.9).

One `lungkit segment` process with every core, then N `--shard K/N` processes at the same time, each pinned to
its own cores (as Slurm pins array tasks; unpinned, each would start a thread per core and they would fight
over them), then `lungkit merge`. Wall time of the whole commands, model loading included, over the same
images. Also checks that the merged manifest and masks equal the single run's.

Usage: python benchmarks/bench_shards.py [--n 96] [--shards 2] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_segment import make_inputs  # noqa: E402


def lungkit(*args, cores: list[int] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lungmask_kit.cli.app", *map(str, args)]
    preexec = (lambda: os.sched_setaffinity(0, cores)) if cores else None
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=preexec)


def wait_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.wait() not in (0, 1):
            raise RuntimeError(p.stderr.read())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < args.shards:
        raise SystemExit(f"{len(cores)} cores cannot hold {args.shards} pinned shards")
    per = len(cores) // args.shards
    work = Path(tempfile.mkdtemp(prefix="lungkit-shards-"))
    try:
        src = make_inputs(work / "in", args.n, "example", 0, "png")
        common = ["-b", args.batch_size, "-q", "--min-lung-fraction", "0"]
        t = time.perf_counter()
        wait_all([lungkit("segment", src, "-o", work / "single", *common)])
        single = time.perf_counter() - t
        t = time.perf_counter()
        wait_all([lungkit("segment", src, "-o", work / "sharded", "--shard", f"{k + 1}/{args.shards}", *common,
                          cores=cores[k * per:(k + 1) * per]) for k in range(args.shards)])
        shards_done = time.perf_counter() - t
        wait_all([lungkit("merge", work / "sharded", "-q")])
        sharded = time.perf_counter() - t
        import pyarrow.parquet as pq

        same = pq.read_table(work / "single" / "manifest.parquet").replace_schema_metadata(None).equals(
            pq.read_table(work / "sharded" / "manifest.parquet").replace_schema_metadata(None))
        same_masks = all((work / "single" / "masks" / p.name).read_bytes() == p.read_bytes()
                         for p in (work / "sharded" / "masks").glob("*.png"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    r = {"n": args.n, "shards": args.shards, "cores": len(cores), "batch_size": args.batch_size,
         "single_s": single, "single_img_s": args.n / single, "shards_s": shards_done, "sharded_with_merge_s": sharded,
         "sharded_img_s": args.n / sharded, "ratio": single / sharded, "identical": same and same_masks}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"shards-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(r, indent=2))
    print(f"one process, {len(cores)} cores:        {single:6.1f} s  {r['single_img_s']:.2f} img/s")
    print(f"{args.shards} shards x {per} core(s) + merge:  {sharded:6.1f} s  {r['sharded_img_s']:.2f} img/s "
          f"(shards {shards_done:.1f} s, merge {sharded - shards_done:.1f} s)")
    print(f"ratio sharded / single: {r['ratio']:.2f} (target >= 0.9); manifest and masks identical: {r['identical']}")


if __name__ == "__main__":
    main()

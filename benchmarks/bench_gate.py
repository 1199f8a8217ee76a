#!/usr/bin/env python
"""How the input gate treats collections it was not fitted on (leave one collection out).

The gate's image part is a density of the segmenter's encoder features on training images; its shape part the
statistics of the model's masks on them. Fitted on one collection, does it flag clean frontal CXRs of another
hospital for being from another hospital, while still flagging lateral views and CT slices? For each fit
(cxr-seg alone, cxr-seg-jsrt alone, both: what `lungkit train` / `calibrate` ship), the share of images flagged
(ood_score = max(image, shape) > 1) in every collection: the fitted collections on their validation images,
the others whole. Also the same with the image part alone.

Usage: python benchmarks/bench_gate.py [--weights PATH] [--convention v7] [--shared ../shared/data]
       [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lungmask_kit.postprocess import PostprocessSettings  # noqa: E402
from lungmask_kit.runtime import prepare_device  # noqa: E402
from lungmask_kit.training.calibrate import fit_image_density, fit_shape, observe  # noqa: E402
from lungmask_kit.training.data import Pair, split_pairs  # noqa: E402


def collections(shared: Path) -> dict[str, tuple[list[Pair], list[Pair]]]:
    """name -> (train pairs, validation pairs); collections without masks are all 'validation' (never fitted)."""
    seg = [Pair(shared / "cxr-seg/images" / f"{r['name']}.png", shared / "cxr-seg/masks" / f"{r['name']}.png",
                r["patient_id"]) for r in csv.DictReader(open(shared / "cxr-seg/pairs.csv"))]
    jsrt = [Pair(shared / "cxr-seg-jsrt" / r["image"], shared / "cxr-seg-jsrt" / r["mask"], "jsrt:" + r["name"], None,
                 "jsrt") for r in csv.DictReader(open(shared / "cxr-seg-jsrt/pairs.csv"))]
    cls = [Pair(shared / "cxr-cls" / r["path"], shared / "cxr-cls" / r["path"], r["patient_id"])
           for r in csv.DictReader(open(shared / "cxr-cls/labels.csv"))]
    ood = [Pair(shared / "cxr-ood/images" / r["name"], shared / "cxr-ood/images" / r["name"], r["patient_id"])
           for r in csv.DictReader(open(shared / "cxr-ood/list.csv"))]
    out = {}
    for name, pairs in (("cxr-seg", seg), ("cxr-seg-jsrt", jsrt)):
        train, val, _ = split_pairs(pairs, 0.2, 0)  # the split lungkit train makes (each collection alone)
        out[name] = (train, val)
    out["cxr-cls"] = ([], cls)
    out["cxr-ood"] = ([], ood)
    return out


def gate_arguments(doc: str, seed: bool = False) -> argparse.Namespace:
    """The options every gate benchmark takes: the model, the convention, the shared data and where results go;
    `seed`: also the seed of the acquisition augmentations (a view gate's fit depends on its draw)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--convention", default="v7")
    ap.add_argument("--shared", type=Path, default=REPO.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    if seed:
        ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def main() -> None:
    args = gate_arguments(__doc__)

    from lungmask_kit.inference import Segmenter

    seg = Segmenter(args.weights, prepare_device("cpu"), args.convention)
    post = PostprocessSettings(threshold=seg.config.threshold)
    t0 = time.perf_counter()
    seen = {}
    for name, (train, val) in collections(args.shared).items():
        seen[name] = (observe(seg, train, False, post), observe(seg, val, False, post))
        print(f"{name}: {len(train)} train / {len(val)} other images observed", flush=True)
    fits = {"cxr-seg": ["cxr-seg"], "cxr-seg-jsrt": ["cxr-seg-jsrt"], "both": ["cxr-seg", "cxr-seg-jsrt"]}
    results = {}
    for fit_name, members in fits.items():
        train = [o for m in members for o in seen[m][0]]
        val = [o for m in members for o in seen[m][1]]
        image = fit_image_density(np.array([o.pooled for o in train]), np.array([o.pooled for o in val]))
        shape = fit_shape([o.values for o in train], [o.values for o in val])
        row = {}
        for name, (fit_part, rest) in seen.items():
            others = rest if name in members else fit_part + rest  # a held-out collection whole
            img = np.array([float(image.raw_score(o.pooled)[0]) / image.threshold for o in others])
            shp = np.array([shape.raw_score(o.values) / shape.threshold for o in others])
            row[name] = {"n": len(others), "held_out": name not in members,
                         "flagged": round(float(np.mean(np.maximum(img, shp) > 1)), 4),
                         "flagged_by_image_part": round(float(np.mean(img > 1)), 4)}
        results[fit_name] = row
    # the gate the model ships with (stored in its config), on the same images
    if seg.quality is not None:
        row = {}
        for name, (_, others) in seen.items():
            scores = [seg.quality.assess_values({k: v for k, v in o.values.items() if k != "flip_dice"}, o.pooled)
                      for o in others]
            row[name] = {"n": len(others), "flagged": round(float(np.mean([a.ood_score > 1 for a in scores])), 4),
                         "flagged_by_image_part": round(float(np.mean([a.ood_image_score > 1 for a in scores])), 4)}
        results["shipped"] = row

    print(f"\ngate flag rates, {args.convention} convention ({time.perf_counter() - t0:.0f} s); "
          "fitted collections on their validation images, the others whole")
    names = list(seen)
    print(f"{'fitted on':<14}" + "".join(f"{n:>22}" for n in names))
    for fit_name, row in results.items():
        cells = "".join(f"{row[n]['flagged']:>9.1%} ({row[n]['flagged_by_image_part']:>6.1%} img)" for n in names)
        print(f"{fit_name:<14}{cells}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gate-{args.convention}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"weights": args.weights or "bundled", "convention": args.convention,
                                "results": results}, indent=1))
    print(f"written {path}")


if __name__ == "__main__":
    main()

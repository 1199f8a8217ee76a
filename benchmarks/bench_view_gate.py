#!/usr/bin/env python
"""Does the input gate hold on collections it has never seen? Leave one collection out, for the view gate
(`calibrate --negatives`, the bundled model's) and, for comparison, the density gate (calibration without
negatives).

Frontal collections (../shared/data): ieee (cxr-seg and cxr-cls's ieee images: one public collection), cxr-seg-jsrt,
cxr-heart, cxr-cls's actualmed and figure1 sources. For each, both gates are fitted on all the others (80% of
their images, by patient, with augmented copies; 20% place the scale) and the share of the left-out collection
flagged is measured. Non-frontal images: cxr-ood's lateral radiographs and CT slices (left out a patient at a
time) and the installed packages' sample pictures (left out a package at a time), each scored by a gate fitted
without it. "gate" is what QC flags: image part or mask-shape part (its statistics refitted the same way) > 1.

The network is the bundled one (or --weights): its encoder saw cxr-seg, cxr-seg-jsrt and cxr-heart in training,
so this measures the gate's fit, not the segmenter's; the cxr-cls sources are unseen by both.

Usage: python benchmarks/bench_view_gate.py [--weights PATH] [--convention v7] [--shared ../shared/data]
       [--seed 0] [--out benchmarks/results]
"""

from __future__ import annotations

import csv
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_gate import gate_arguments  # noqa: E402

from lungmask_kit.imaging import read_model_view  # noqa: E402
from lungmask_kit.postprocess import PostprocessSettings, clean_mask  # noqa: E402
from lungmask_kit.quality import shape_descriptors  # noqa: E402
from lungmask_kit.runtime import prepare_device  # noqa: E402
from lungmask_kit.training.calibrate import fit_image_density, fit_shape  # noqa: E402
from lungmask_kit.training.view_gate import (  # noqa: E402
    FRONTAL_COPIES,
    MIN_SIDE,
    NEGATIVE_COPIES,
    acquisition_augment,
    fit_view_gate,
    package_negatives,
    read_negative,
)


def images(shared: Path) -> list[dict]:
    """Every image: collection (frontal) or group (non-frontal), unit (patient), kind, path."""
    out = []
    for r in csv.DictReader(open(shared / "cxr-seg/pairs.csv")):
        out.append(dict(collection="ieee", unit=r["patient_id"], kind="frontal", path=shared / "cxr-seg/images" / f"{r['name']}.png"))
    for r in csv.DictReader(open(shared / "cxr-cls/labels.csv")):
        out.append(dict(collection=r["source"], unit=r["patient_id"], kind="frontal", path=shared / "cxr-cls" / r["path"]))
    for r in csv.DictReader(open(shared / "cxr-seg-jsrt/pairs.csv")):
        out.append(dict(collection="cxr-seg-jsrt", unit=r["name"], kind="frontal", path=shared / "cxr-seg-jsrt" / r["image"]))
    for r in csv.DictReader(open(shared / "cxr-heart/pairs.csv")):
        out.append(dict(collection="cxr-heart", unit=r["name"], kind="frontal", path=shared / "cxr-heart/images" / r["name"]))
    for r in csv.DictReader(open(shared / "cxr-ood/list.csv")):
        kind = "lateral" if r["view"] == "L" else "cross-sectional"
        out.append(dict(collection=f"cxr-ood {kind}", unit="ood:" + r["patient_id"], kind=kind,
                        path=shared / "cxr-ood/images" / r["name"]))
    for n in package_negatives():
        package = n.path.parts[n.path.parts.index("site-packages") + 1] if "site-packages" in n.path.parts else "package"
        try:
            kind = read_negative(n)[1]
        except Exception:  # noqa: BLE001 -- pydicom's deliberately broken test files
            continue
        out.append(dict(collection="package pictures", unit="pkg:" + package, kind=kind, path=n.path))
    return out


def observe(seg, rows: list[dict], convention: str, rng) -> tuple[np.ndarray, list[dict], list[dict]]:
    """Pooled features and shape descriptors of each readable image and of its augmented copies."""
    post = PostprocessSettings(threshold=seg.config.threshold)
    feats, shapes, meta, batch, info = [], [], [], [], []

    def flush():
        if batch:
            pred = seg.predict_batch(np.stack([seg.prepare(b) for b in batch]))
            feats.append(pred.pooled)
            shapes.extend(shape_descriptors(clean_mask(p, post)) for p in pred.probabilities)
            meta.extend(info)
            batch.clear()
            info.clear()

    for row in rows:
        try:
            image = read_model_view(row["path"])
        except Exception:  # noqa: BLE001 -- pydicom's deliberately broken test files
            continue
        if min(image.shape) < MIN_SIDE:
            continue
        copies = FRONTAL_COPIES if row["kind"] == "frontal" else NEGATIVE_COPIES
        for copy in range(copies + 1):
            batch.append(image if copy == 0 else acquisition_augment(image, rng))
            info.append({**row, "copy": copy})
            if len(batch) == 32:
                flush()
    flush()
    return np.concatenate(feats), shapes, meta


def main() -> None:
    args = gate_arguments(__doc__, seed=True)

    from lungmask_kit.inference import Segmenter

    t0 = time.perf_counter()
    seg = Segmenter(args.weights, prepare_device("cpu"), args.convention)
    rng = np.random.default_rng(args.seed)
    x, shapes, meta = observe(seg, images(args.shared), args.convention, rng)
    print(f"{len(meta)} images and copies observed ({time.perf_counter() - t0:.0f} s)", flush=True)
    frontal = np.array([m["kind"] == "frontal" for m in meta])
    original = np.array([m["copy"] == 0 for m in meta])
    collection = np.array([m["collection"] for m in meta])
    unit = np.array([m["unit"] for m in meta])
    kinds = np.array([m["kind"] for m in meta])
    # one validation fifth of the frontal patients, the same for every fit (it places the gates' scales)
    units = np.unique(unit[frontal])
    val_units = set(np.random.default_rng(1).choice(units, len(units) // 5, replace=False))
    val = frontal & original & np.array([u in val_units for u in unit])
    fit_frontal = frontal & ~np.isin(unit, list(val_units))

    def gates(train_frontal: np.ndarray, val_frontal: np.ndarray, negatives: np.ndarray):
        view = fit_view_gate(x[train_frontal], x[val_frontal], x[negatives], kinds[negatives].tolist())
        density = fit_image_density(x[train_frontal & original], x[val_frontal])
        shape = fit_shape([shapes[i] for i in np.where(train_frontal & original)[0]],
                          [shapes[i] for i in np.where(val_frontal)[0]])

        def score(idx):
            v = view.scores(x[idx])[0]
            d = density.raw_score(x[idx]) / density.threshold
            s = np.array([shape.raw_score(shapes[i]) / shape.threshold for i in idx])
            return v, d, s
        return score

    def rates(v, d, s) -> dict:
        return {"n": len(v), "view_image": round(float(np.mean(v > 1)), 4), "view_gate": round(float(np.mean(np.maximum(v, s) > 1)), 4),
                "density_image": round(float(np.mean(d > 1)), 4), "density_gate": round(float(np.mean(np.maximum(d, s) > 1)), 4),
                "view_image_median": round(float(np.median(v)), 3)}

    results = {"frontal (left out)": {}, "non-frontal (left out)": {}}
    for left in dict.fromkeys(collection[frontal]):
        score = gates(fit_frontal & (collection != left), val & (collection != left), ~frontal)
        idx = np.where(frontal & original & (collection == left))[0]
        results["frontal (left out)"][left] = rates(*score(idx))
        print(f"  left out {left}: {results['frontal (left out)'][left]}", flush=True)
    scored = defaultdict(lambda: ([], [], []))
    missed = []  # non-frontal images the view gate lets through: (name, image score, shape score)
    for held in dict.fromkeys(unit[~frontal]):
        score = gates(fit_frontal, val, ~frontal & (unit != held))
        idx = np.where(~frontal & original & (unit == held))[0]
        v, d, s = score(idx)
        for part, values in zip(scored[collection[idx[0]]], (v, d, s)):
            part.extend(values)
        missed += [(Path(meta[i]["path"]).name, round(float(a), 3), round(float(b), 3))
                   for i, a, b in zip(idx, v, s) if max(a, b) <= 1]
    for name, (v, d, s) in scored.items():
        results["non-frontal (left out)"][name] = rates(np.array(v), np.array(d), np.array(s))
    print(f"\nshare flagged, {args.convention} masks ({time.perf_counter() - t0:.0f} s); gate = image part or mask-shape part")
    print(f"{'':34}{'n':>5}{'view gate':>11}{'(image)':>9}{'density gate':>14}{'(image)':>9}")
    for part, rows in results.items():
        print(part)
        for name, r in rows.items():
            print(f"  {name:32}{r['n']:>5}{r['view_gate']:>11.1%}{r['view_image']:>9.1%}{r['density_gate']:>14.1%}"
                  f"{r['density_image']:>9.1%}")
    if missed:
        print("non-frontal images the view gate lets through (image score, shape score): "
              + ", ".join(f"{name} ({a}, {b})" for name, a, b in missed))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"view-gate-{args.convention}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"weights": args.weights or "bundled", "convention": args.convention,
                                "seed": args.seed, "frontal_copies": FRONTAL_COPIES, "negative_copies": NEGATIVE_COPIES,
                                "results": results, "missed": missed}, indent=1))
    print(f"written {path}")


if __name__ == "__main__":
    main()

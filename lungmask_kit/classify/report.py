"""The audit's outputs: metrics.json, predictions.parquet, results.md and the figures (ROC with a 95% band,
metrics with interval bars, Grad-CAM examples)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from lungmask_kit.classify.audit import METRICS, patient_draws
from lungmask_kit.fileio import atomic_write_bytes
from lungmask_kit.manifest import write_table
from lungmask_kit.metrics import roc_auc, roc_curve
from lungmask_kit.plots import metrics_png, roc_png, saliency_png

METHOD = ("Each variant is trained once per seed on the same patient-level split. A metric is the mean over seeds "
          "on the test split; <metric>_ci95 is the 2.5-97.5 percentile range of a patient-level bootstrap (patients "
          "drawn with replacement, every seed scored on each draw, averaged over seeds). Comparisons are paired (the "
          "same draws for both variants); p is two-sided, 2 x the smaller share of draws on either side of zero.")


def write_outputs(out: Path, result: dict, predictions: list[dict], examples: dict, settings, checkpoint) -> None:
    doc = {"variants": result["metrics"], "comparisons": result.get("comparisons", []),
           "source_prediction": result.get("source_prediction"), "leave_one_source_out": result.get("leave_one_source_out"),
           "method": METHOD, "settings": dataclasses.asdict(settings)}
    atomic_write_bytes(out / "metrics.json", json.dumps(doc, indent=2, default=_plain).encode())
    schema = pa.schema([("variant", pa.string()), ("seed", pa.int32()), ("image", pa.string()), ("patient_id", pa.string()),
                        ("label", pa.int8()), ("probability", pa.float64()), ("prediction", pa.int8())])
    write_table(pa.Table.from_pylist(predictions, schema=schema), out / "predictions.parquet")
    curves, bands = roc_with_bands(result["metrics"], predictions, settings)
    atomic_write_bytes(out / "roc.png", roc_png(curves, bands))
    atomic_write_bytes(out / "metrics.png", metrics_png(result["metrics"]))
    if examples:
        atomic_write_bytes(out / "saliency.png", saliency_png(examples))
    text = results_markdown(result, settings, checkpoint, bool(examples))
    atomic_write_bytes(out / "results.md", text.encode())


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(type(value).__name__)


def roc_with_bands(metrics: dict, predictions: list[dict], settings, grid_points: int = 101) -> tuple[dict, dict]:
    """Per variant: the ROC of the seed-averaged probability, and a 95% band of TPR over a FPR grid from the
    patient bootstrap."""
    curves, bands = {}, {}
    grid = np.linspace(0, 1, grid_points)
    for variant, m in metrics.items():
        rows = [p for p in predictions if p["variant"] == variant]
        images = sorted({p["image"] for p in rows})
        index = {im: k for k, im in enumerate(images)}
        prob = np.zeros(len(images))
        count = np.zeros(len(images))
        labels, patients = np.zeros(len(images), int), [""] * len(images)
        for p in rows:
            k = index[p["image"]]
            prob[k] += p["probability"]
            count[k] += 1
            labels[k], patients[k] = p["label"], p["patient_id"]
        prob /= np.maximum(count, 1)
        if len(set(labels.tolist())) < 2:
            continue
        fpr, tpr = roc_curve(labels, prob)
        curves[variant] = (fpr, tpr, m.get("roc_auc"), m.get("roc_auc_ci95"))
        tprs = []
        for draw in patient_draws(patients, min(settings.bootstrap, 400), settings.seed):
            if len(set(labels[draw].tolist())) == 2 and roc_auc(labels[draw], prob[draw]) is not None:
                f, t = roc_curve(labels[draw], prob[draw])
                tprs.append(np.interp(grid, f, t))
        if tprs:
            bands[variant] = (grid, np.percentile(tprs, 2.5, axis=0), np.percentile(tprs, 97.5, axis=0))
    return curves, bands


def _fmt(m: dict, name: str) -> str:
    value, ci = m.get(name), m.get(f"{name}_ci95")
    if value is None:
        return "n/a"
    return f"{value:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")


def comparison_table(metrics: dict, settings) -> str:
    """Markdown: each metric per variant, with its 95% interval in brackets."""
    head = "| variant | normalisation | channels | seeds | " + " | ".join(n.replace("roc_auc", "ROC AUC") for n in METRICS) + " | n |"
    lines = [head, "|" + "---|" * (len(METRICS) + 5)]
    for variant, m in metrics.items():
        lines.append(f"| {variant} | {settings.normalize} | {settings.channels} | {m.get('seeds', 1)} | "
                     + " | ".join(_fmt(m, n) for n in METRICS) + f" | {m['n']} |")
    return "\n".join(lines)


def results_markdown(result: dict, settings, checkpoint, saliency_figure: bool) -> str:
    info, metrics = result["info"], result["metrics"]
    lines = ["# lungkit classify results", "",
             f"Positive class: `{info['positive']}` vs the rest ({', '.join(info['labels'])}). Train {result['n_train']} / "
             f"test {result['n_test']} images, split {result['how']}. Architecture `{settings.arch}` (init: {settings.init}), "
             f"{settings.image_size} px, {settings.epochs} epochs, seeds {settings.seed_list}, threshold {settings.threshold}. "
             f"Excluded: {info['excluded_error']} failed, {info['excluded_qc']} QC-flagged, {info['excluded_unlabelled']} "
             "unlabelled rows" + (f", {info['excluded_outside']} whose paths lead out of the run's folders"
                                  if info.get("excluded_outside") else "") + "."
             + (f" Patients: {info['grouping']}." if info.get("grouping") else "") + (f" Scored with checkpoint `{Path(checkpoint).name}`." if checkpoint else ""),
             "", comparison_table(metrics, settings), "", f"Intervals: {METHOD}", ""]
    for note in result.get("warnings", []):
        lines += [f"**Not enough data for intervals or p-values**: {note}. The values above describe this test split "
                  "only; the table shows no interval for them.", ""]
    if result.get("comparisons"):
        lines += ["## Comparisons", "", *(f"- {c['sentence']}" for c in result["comparisons"]), ""]
    sal = {v: m for v, m in metrics.items() if m.get("saliency_in_lungs") is not None}
    if sal:
        lines += ["## Where the classifier looks", "",
                  "Share of the positive Grad-CAM attribution inside the lung mask (mean over test images and seeds, "
                  "95% CI by patient):", "",
                  *(f"- {v}: {m['saliency_in_lungs']:.2f}" + (f" ({m['saliency_in_lungs_ci95'][0]:.2f}-"
                    f"{m['saliency_in_lungs_ci95'][1]:.2f})" if m.get("saliency_in_lungs_ci95") and not m.get("note") else "")
                    for v, m in sal.items()), ""]
        if saliency_figure:
            lines += ["![Grad-CAM examples](saliency.png)", ""]
    lines += _leakage_lines(result)
    lines += ["![ROC per variant](roc.png) ![Metrics per variant](metrics.png)", "",
              f"Time: {result['seconds']:.0f} s.", "",
              "If lungs-removed images score about as well as lungs-only ones, the classifier relies on what lies outside "
              "the lungs (source, text, devices, image style) rather than on lung findings."]
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _leakage_lines(result: dict) -> list[str]:
    lines = []
    src = result.get("source_prediction")
    if src and "variants" in src:
        lines += ["## Source leakage", "",
                  f"A classifier trained to predict the source ({', '.join(f'{k} {n}' for k, n in src['sources'].items())}) "
                  "from each variant; ROC AUC on the test split (macro one-vs-rest for more than two sources):", ""]
        if src.get("note"):
            lines += [f"Note: {src['note']}; the AUCs below describe this test split only.", ""]
        for v, r in src["variants"].items():
            ci = r.get("auc_ci95")
            lines.append(f"- {v}: " + ("n/a" if r["auc"] is None else f"{r['auc']:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else "")))
        lines.append("")
    elif src and "skipped" in src:
        lines += ["## Source leakage", "", f"Skipped: {src['skipped']}.", ""]
    loso = result.get("leave_one_source_out")
    notes: list[str] = []
    if loso and "held_out" in loso:
        lines += ["## Leave one source out", "", "| held-out source | n (positive) | variant | accuracy | sensitivity | specificity | ROC AUC |",
                  "|---|---|---|---|---|---|---|"]
        for held, e in loso["held_out"].items():
            if "skipped" in e:
                lines.append(f"| {held} | {e['n']} ({e['positives']}) | - | skipped: {e['skipped']} | | | |")
                continue
            if e.get("note"):
                notes.append(f"{held}: {e['note']}")
            for v, m in e["variants"].items():
                auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
                lines.append(f"| {held} | {e['n']} ({e['positives']}) | {v} | {_num(m['accuracy'])} | {_num(m['sensitivity'])} | "
                             f"{_num(m['specificity'])} | {auc} |")
        lines.append("")
        lines += [f"Note: {n}; that row describes those few images only." for n in notes] + ([""] if notes else [])
    return lines


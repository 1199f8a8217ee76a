"""`run_classify`: the whole shortcut audit in one call. Per variant, `seeds` classifiers on one patient-level
split; metrics with patient-bootstrap intervals and paired comparisons; Grad-CAM share inside the lungs; and,
when the manifest names each image's source, how well the variant predicts the source and how the classifier
fares on a source it never saw (leave-one-source-out)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lungmask_kit.classify.audit import mean_ci, summarize
from lungmask_kit.classify.data import ClassifySettings, ImageCache, Sample, load_samples, lung_masks, split_samples
from lungmask_kit.classify.leakage import leave_one_source_out, source_prediction
from lungmask_kit.classify.model import (
    CachedImages,
    build_classifier,
    cams_for,
    classifier_config,
    normalisation,
    predict,
    saliency_in_lungs,
    save_checkpoint,
    train_model,
)
from lungmask_kit.classify.report import write_outputs
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import check_replaceable, make_dirs, output_errors
from lungmask_kit.models.modeling import load_model
from lungmask_kit.runtime import prepare_device

# progress lines go here unless the caller passes `log` (the CLI passes typer.echo); silent by default
logger = logging.getLogger(__name__)


MARKER = ".lungkit-classify"  # an output folder holding it is ours to write into again
CACHE_DIR = ".lungkit-cache"  # --cache disk: memory-mapped images, removed at the end (never OUT/.cache)


@dataclass
class _Run:
    """What one audit shares between its steps."""

    settings: ClassifySettings
    cache: ImageCache
    device: torch.device
    out: Path
    progress: bool
    log: Callable[[str], None]
    predictions: list[dict] = field(default_factory=list)
    examples: dict = field(default_factory=dict)  # variant -> (images, cams, masks) of a few test images
    norms: dict = field(default_factory=dict)  # (variant, training images) -> normalisation, once for all seeds

    def dataset(self, variant: str, samples: list[Sample], targets, norm, augment: bool, classes: int = 1) -> CachedImages:
        array, rows = self.cache.rows(variant, samples)
        mean, std, channels = norm
        return CachedImages(array, rows, targets, mean, std, channels, augment, classes)

    def train(self, variant: str, train: list[Sample], seed: int, targets=None, classes: int = 1, task: str = "covid"):
        """A fresh model of this variant trained with `seed`: (model, config, normalisation)."""
        key = (variant, tuple(s.image for s in train))
        if key not in self.norms:
            self.norms[key] = normalisation(self.settings, self.cache, variant, train)
        norm = self.norms[key]
        config = classifier_config(self.settings, variant, *norm[:2], norm[2], classes, task)
        torch.manual_seed(seed)  # the same initial weights for every variant of a seed
        model = build_classifier(config, self.settings.init).to(self.device).to(memory_format=torch.channels_last)
        targets = [s.label for s in train] if targets is None else targets
        ds = self.dataset(variant, train, targets, norm, augment=True, classes=classes)
        train_model(model, ds, self.settings, seed, self.device, self.progress, self.log, f"{variant}/{task}/seed {seed}")
        return model, config, norm


def run_classify(manifest, out, settings: ClassifySettings, device: str | torch.device = "auto", labels_files=None,
                 checkpoint=None, progress=True, log: Callable[[str], None] = logger.info) -> dict:
    """Train (or with `checkpoint`, only score) the audit's classifiers; write every output to `out`."""
    t0 = time.perf_counter()
    manifest, out = Path(manifest), Path(out)
    device = prepare_device(device)
    samples, info = load_samples(manifest, settings, labels_files)  # a run folder or its manifest
    check_replaceable(out, manifest.parent if manifest.suffix == ".parquet" else manifest, MARKER, "lungkit classify",
                      allow_inside_run=True)
    with output_errors(out):
        make_dirs(out)
        (out / MARKER).write_text("results of `lungkit classify`; a re-run overwrites them\n")
        return _run_in(out, manifest, samples, info, settings, device, checkpoint, progress, log, t0)


def _run_in(out: Path, manifest: Path, samples: list[Sample], info: dict, settings: ClassifySettings, device,
            checkpoint, progress: bool, log: Callable[[str], None], t0: float) -> dict:
    _check_variants(samples, settings, manifest)
    train, test, how = _split(samples, settings, checkpoint)
    log(f"{len(samples)} images ({info['positive']!r} positive: {sum(s.label for s in samples)}); "
        f"train {len(train)}, test {len(test)} ({how})")
    log(f"patients: {info['grouping']}")
    cache = ImageCache(settings.image_size, out / CACHE_DIR if settings.cache == "disk" else None)
    run = _Run(settings, cache, device, out, progress, log)
    try:
        result = _score_checkpoint(run, test, checkpoint) if checkpoint is not None else _audit(run, samples, train, test)
    finally:
        cache.close()
    result.update(info=info, how=how, n_train=len(train), n_test=len(test), seconds=time.perf_counter() - t0)
    write_outputs(out, result, run.predictions, run.examples, settings, checkpoint)
    return result


def _check_variants(samples, settings, manifest) -> None:
    for variant in settings.variants:
        missing = [s.image for s in samples if variant not in s.files]
        if missing:
            raise LungkitError(f"{len(missing)} image(s) have no {variant!r} file in {manifest} (e.g. {missing[0]}); "
                               "make the variants with lungkit segment or lungkit variants")


def _split(samples, settings, checkpoint):
    if checkpoint is None:
        return split_samples(samples, settings.test_fraction, settings.seed)
    test = [s for s in samples if s.split == "test"] if any(s.split for s in samples) else []
    return [], (test or samples), ("test split" if test else "all eligible rows (evaluation only)")


def _audit(run: _Run, samples, train, test) -> dict:
    s = run.settings
    masks = lung_masks(test, s.image_size) if s.saliency else None
    probs_by_variant, saliency = {}, {}
    for variant in s.variants:
        probs_by_variant[variant], saliency[variant] = _variant(run, variant, train, test, masks)
    metrics, comparisons = summarize([t.label for t in test], [t.patient_id for t in test], probs_by_variant,
                                     s.threshold, s.bootstrap, s.seed)
    for variant, per_image in saliency.items():
        if per_image is not None:
            _add_saliency(metrics[variant], test, per_image, s)
    result = {"metrics": metrics, "comparisons": comparisons, "warnings": _notes(metrics)}
    if s.leakage:
        result["source_prediction"] = source_prediction(run, samples, train, test)
        result["leave_one_source_out"] = leave_one_source_out(run, samples)
    return result


def _variant(run: _Run, variant: str, train, test, masks):
    """Every seed's model of one variant: (test probabilities per seed, per-image saliency_in_lungs averaged
    over seeds or None)."""
    s = run.settings
    run.cache.rows(variant, train + test)  # fill the cache once, in one array, before the first model
    probs, shares = [], []
    for k, seed in enumerate(s.seed_list):
        model, config, norm = run.train(variant, train, seed)
        name = f"{variant}.safetensors" if k == 0 else f"{variant}-seed{seed}.safetensors"
        save_checkpoint(model, config, run.out / "checkpoints" / name)
        ds = run.dataset(variant, test, [t.label for t in test], norm, augment=False)
        p = predict(model, ds, run.device, s.batch_size, s.precision)
        probs.append(p)
        run.predictions += [{"variant": variant, "seed": seed, "image": t.image, "patient_id": t.patient_id, "label": t.label,
                             "probability": float(v), "prediction": int(v >= s.threshold)} for t, v in zip(test, p)]
        if masks is not None:
            cams = cams_for(model, ds, run.device, s.batch_size)
            shares.append(saliency_in_lungs(cams, masks))
            if k == 0:
                run.examples[variant] = _examples(run, variant, test, cams, masks)
        run.log(f"{variant} seed {seed}: done")
    if not shares:
        return probs, None
    stacked = np.stack(shares)
    known = np.isfinite(stacked)
    per_image = np.where(known.any(0), np.where(known, stacked, 0).sum(0) / np.maximum(known.sum(0), 1), np.nan)
    return probs, per_image


def _examples(run: _Run, variant: str, test, cams, masks, n: int = 4) -> tuple:
    """A few test images (positives first) with their maps, the same images for every variant."""
    order = sorted(range(len(test)), key=lambda i: (-test[i].label, test[i].image))[:n]
    array, rows = run.cache.rows(variant, [test[i] for i in order])
    return array[rows].astype(np.float32) / ImageCache.SCALE, cams[order], masks[order], [test[i].image for i in order]


def _notes(metrics: dict) -> list[str]:
    """The statistics' notes, once each (the same test split is behind every variant)."""
    return sorted({m["note"] for m in metrics.values() if m.get("note")})


def _add_saliency(m: dict, test, per_image: np.ndarray, s: ClassifySettings) -> None:
    by_patient: dict[str, list[float]] = {}
    for t, v in zip(test, per_image):
        by_patient.setdefault(t.patient_id, []).append(float(v))
    m["saliency_in_lungs"], m["saliency_in_lungs_ci95"] = mean_ci(by_patient, s.bootstrap, s.seed)


def _score_checkpoint(run: _Run, test, checkpoint) -> dict:
    """--eval-only: the checkpoint's variant scored on this manifest (one model: intervals from the bootstrap)."""
    model, config, _ = load_model(checkpoint, run.device)
    if config.task != "classification":
        raise LungkitError(f"{checkpoint} is not a classifier checkpoint")
    if run.cache.size != config.input_size:
        run.cache = ImageCache(config.input_size, run.cache.folder)
    probs = {}
    for variant in run.settings.variants:
        ds = run.dataset(variant, test, [t.label for t in test], (config.mean, config.std, config.in_channels), augment=False)
        probs[variant] = [predict(model.to(memory_format=torch.channels_last), ds, run.device, run.settings.batch_size,
                                  run.settings.precision)]
        run.predictions += [{"variant": variant, "seed": None, "image": t.image, "patient_id": t.patient_id, "label": t.label,
                             "probability": float(v), "prediction": int(v >= config.threshold)} for t, v in zip(test, probs[variant][0])]
    metrics, comparisons = summarize([t.label for t in test], [t.patient_id for t in test], probs, config.threshold,
                                     run.settings.bootstrap, run.settings.seed)
    return {"metrics": metrics, "comparisons": comparisons, "warnings": _notes(metrics)}

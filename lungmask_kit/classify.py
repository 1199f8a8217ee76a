"""`lungkit classify`: train and compare COVID-19 classifiers on original / lungs-only / lungs-removed images.

A classifier that scores as well on lungs-removed images as on lungs-only ones is learning shortcuts
(source, markers, style) rather than lung findings; this module makes that audit one call.

Design choices (documented in the README):
- binary: the positive label (default: the one containing "covid" or "positive") against every other label;
- class imbalance: BCE with pos_weight = n_negative / n_positive on the training split;
- splits: a manifest `split` column is used as is (train / val / test); otherwise whole patients are split,
  stratified by label; a split with one patient on both sides is refused;
- images are decoded once, resized to `image_size` and cached in memory (uint8/uint16), so each epoch is
  model time only; grayscale is replicated to three channels for `channels="rgb"`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lungmask_kit import __version__, defaults
from lungmask_kit.choices import Channels, Normalization, VariantChoice
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import atomic_write_bytes
from lungmask_kit.imaging import ImageDecodeError, read_gray, to_unit_range
from lungmask_kit.manifest import read_metadata, resolve_folder
from lungmask_kit.metrics import binary_classification_metrics, roc_curve
from lungmask_kit.models.modeling import ModelConfig, build_model, load_model, save_model

VARIANT_COLUMNS = {"original": None, "lungs": "lungs_path", "nolungs": "nolungs_path"}


def variants_to_run(variant: str, checkpoint=None) -> tuple[str, ...]:
    """The variants a run covers: one, or all three; with a checkpoint and `all`, the one it was trained on."""
    variant = VariantChoice(variant).value
    if variant != "all":
        return (variant,)
    if checkpoint is not None:
        from lungmask_kit.models.modeling import load_config

        trained_on = load_config(checkpoint)[0].provenance.get("variant")
        if trained_on:
            return (trained_on,)
    return tuple(VARIANT_COLUMNS)
IMAGENET_GRAY_MEAN = float(np.mean(defaults.IMAGENET_MEAN))  # ImageNet stats averaged for 1-channel input
IMAGENET_GRAY_STD = float(np.mean(defaults.IMAGENET_STD))


@dataclass
class ClassifySettings:
    variants: tuple[str, ...] = ("original", "lungs", "nolungs")
    normalize: str = "dataset"  # dataset | imagenet
    channels: str = "gray"  # gray | rgb
    arch: str = "resnet18"
    pretrained: bool = False
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    test_fraction: float = 0.2
    positive: str | None = None
    include_flagged: bool = False
    labels_from_folders: bool = False
    input_root: str | None = None  # where the manifest's original images are now (--input-root)
    threshold: float = 0.5


@dataclass
class Sample:
    image: str  # manifest path (the row key)
    patient_id: str
    label: int
    split: str
    files: dict[str, Path] = field(default_factory=dict)  # variant -> file


# ---------------------------------------------------------------- data


def load_samples(manifest: Path, settings: ClassifySettings, labels_files: list | None = None) -> tuple[list[Sample], dict]:
    """Eligible rows of a segment/variants manifest as samples with integer labels. Returns (samples, info)."""
    import pyarrow.parquet as pq

    meta = read_metadata(manifest)
    rows = pq.read_table(manifest).to_pylist()
    if labels_files:
        from lungmask_kit.labels import match_labels, read_labels

        matched, _, _ = match_labels([r["path"] for r in rows], read_labels(labels_files))
        for r in rows:
            if r["path"] in matched:
                m = matched[r["path"]]
                r.update(label=m.label, patient_id=m.patient_id or r.get("patient_id"), split=m.split or r.get("split"))
    if settings.labels_from_folders:
        for r in rows:
            parts = r["path"].split("/")
            r["label"] = parts[0] if len(parts) > 1 else None
    root = resolve_folder(manifest, meta, "input_root", settings.input_root)
    info = {"rows": len(rows), "excluded_error": 0, "excluded_qc": 0, "excluded_unlabelled": 0}
    labels = sorted({r["label"] for r in rows if r.get("label")})
    if len(labels) < 2:
        raise LungkitError(f"{manifest}: need at least two labels (found {labels}); attach them with --labels or --labels-from-folders")
    positive = settings.positive or next((lab for lab in labels if "covid" in lab.lower() or "positive" in lab.lower()), None)
    if positive not in labels:
        raise LungkitError(f"positive label {positive!r} not among the labels {labels}; choose one with --positive")
    samples = []
    for r in rows:
        if r["status"] != "ok":
            info["excluded_error"] += 1
            continue
        if r.get("qc_pass") is False and not settings.include_flagged:
            info["excluded_qc"] += 1
            continue
        if not r.get("label"):
            info["excluded_unlabelled"] += 1
            continue
        files = {"original": root / r["path"]}
        for variant, col in VARIANT_COLUMNS.items():
            if col and r.get(col):
                files[variant] = manifest.parent / r[col]
        samples.append(Sample(r["path"], r.get("patient_id") or f"image:{r['path']}", int(r["label"] == positive),
                              (r.get("split") or "").lower(), files))
    info.update(positive=positive, labels=labels, n=len(samples))
    return samples, info


def split_samples(samples: list[Sample], test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample], str]:
    """(train, test, how). A split column is used as is; otherwise whole patients, stratified by label."""
    if any(s.split for s in samples):
        train = [s for s in samples if s.split in ("train", "val", "valid", "validation")]
        test = [s for s in samples if s.split == "test"]
        how = "given split column"
    else:
        patients: dict[str, list[Sample]] = {}
        for s in samples:
            patients.setdefault(s.patient_id, []).append(s)
        rng = random.Random(seed)
        test_ids: set[str] = set()
        for label in (0, 1):
            ids = sorted(p for p, ss in patients.items() if round(np.mean([s.label for s in ss])) == label)
            rng.shuffle(ids)
            target = test_fraction * sum(len(patients[p]) for p in ids)
            n = 0
            for p in ids:
                if n >= target:
                    break
                test_ids.add(p)
                n += len(patients[p])
        train = [s for s in samples if s.patient_id not in test_ids]
        test = [s for s in samples if s.patient_id in test_ids]
        how = "by patient, stratified by label"
    check_no_leak(train, test)
    if not train or not test:
        raise LungkitError(f"empty split: {len(train)} training and {len(test)} test images")
    if len({s.label for s in train}) < 2:
        raise LungkitError("the training split holds only one class")
    return train, test, how


def check_no_leak(train: list[Sample], test: list[Sample]) -> None:
    shared = {s.patient_id for s in train} & {s.patient_id for s in test}
    if shared:
        example = sorted(shared)[0]
        raise LungkitError(f"{len(shared)} patient(s) appear in both the training and the test split (e.g. {example}); "
                           "images of one patient must stay on one side")


class _ImageCache:
    """Decoded, resized images per (variant, file), shared by every model trained in one run."""

    def __init__(self, size: int):
        self.size = size
        self._store: dict[Path, np.ndarray] = {}

    def get(self, path: Path) -> np.ndarray:
        if path not in self._store:
            try:
                pixels = read_gray(path)
            except (OSError, ImageDecodeError) as err:
                raise LungkitError(f"cannot read {path}: {err}") from err
            self._store[path] = cv2.resize(pixels, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return self._store[path]


class _ClassifyDataset(Dataset):
    def __init__(self, samples, variant, cache: _ImageCache, mean, std, in_channels, augment):
        from torchvision.transforms import v2

        self.items = [(cache.get(s.files[variant]), s.label) for s in samples]
        self.in_channels = in_channels
        ops = [v2.RandomHorizontalFlip(), v2.RandomAffine(degrees=7, translate=(0.05, 0.05), scale=(0.95, 1.05))] if augment else []
        self.transform = v2.Compose([*ops, v2.Normalize(list(mean), list(std))])

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from torchvision import tv_tensors

        pixels, label = self.items[i]
        x = torch.from_numpy(to_unit_range(pixels))[None].expand(self.in_channels, -1, -1)
        return self.transform(tv_tensors.Image(x)).as_subclass(torch.Tensor), torch.tensor(float(label))


def _stats(samples, variant, cache) -> tuple[float, float]:
    from lungmask_kit.stats import pixel_mean_std

    mean, std, _ = pixel_mean_std(to_unit_range(cache.get(s.files[variant])) for s in samples)
    return mean, max(std, 1e-6)


# ---------------------------------------------------------------- training and scoring


@torch.inference_mode()
def _predict(model, ds, device, batch_size) -> np.ndarray:
    model.eval()
    out = []
    for x, _ in DataLoader(ds, batch_size=batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(x.to(device, memory_format=torch.channels_last))
        out.append(torch.sigmoid(logits.float()[:, 0]).cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def train_variant(variant, train, test, settings: ClassifySettings, cache, device, out: Path, progress, log) -> tuple[dict, np.ndarray]:
    from tqdm.auto import tqdm

    in_channels = 1 if settings.channels == "gray" else 3
    if settings.normalize == "dataset":
        m, s = _stats(train, variant, cache)  # training split only
        mean, std = [m] * in_channels, [s] * in_channels
    elif in_channels == 3:
        mean, std = list(defaults.IMAGENET_MEAN), list(defaults.IMAGENET_STD)
    else:
        mean, std = [IMAGENET_GRAY_MEAN], [IMAGENET_GRAY_STD]
    config = ModelConfig(
        name=f"lungkit-classifier-{variant}", task="classification", arch=settings.arch, encoder=settings.arch,
        in_channels=in_channels, classes=1, input_size=settings.image_size, mean=[round(v, 6) for v in mean],
        std=[round(v, 6) for v in std], threshold=settings.threshold,
        provenance={"lungkit_version": __version__, "variant": variant, "settings": dataclasses.asdict(settings)},
    )
    torch.manual_seed(settings.seed)  # same initial weights for every variant
    model = build_model(config, "imagenet" if settings.pretrained else None).to(device).to(memory_format=torch.channels_last)
    train_ds = _ClassifyDataset(train, variant, cache, mean, std, in_channels, augment=True)
    test_ds = _ClassifyDataset(test, variant, cache, mean, std, in_channels, augment=False)
    n_pos = sum(s.label for s in train)
    pos_weight = torch.tensor((len(train) - n_pos) / max(n_pos, 1), device=device)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    steps = settings.epochs * max(1, len(train_ds) // settings.batch_size)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(settings.seed)
    for epoch in range(settings.epochs):
        model.train()
        loader = DataLoader(train_ds, batch_size=settings.batch_size, shuffle=True, drop_last=len(train_ds) > settings.batch_size, generator=g)
        total, seen = 0.0, 0
        bar = tqdm(loader, desc=f"{variant} epoch {epoch + 1}/{settings.epochs}", disable=not progress, leave=False)
        for x, y in bar:
            x, y = x.to(device, memory_format=torch.channels_last), y.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits = model(x)
            loss = loss_fn(logits.float()[:, 0], y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if scheduler.last_epoch < steps:
                scheduler.step()
            total += loss.item() * len(x)
            seen += len(x)
            bar.set_postfix(loss=f"{total / seen:.4f}")
        log(f"{variant}: epoch {epoch + 1}/{settings.epochs} loss {total / max(seen, 1):.4f}")
    save_model(model, config, out / "checkpoints" / f"{variant}.safetensors")
    probs = _predict(model, test_ds, device, settings.batch_size)
    return binary_classification_metrics([s.label for s in test], probs, settings.threshold), probs


def run_classify(manifest, out, settings: ClassifySettings, device: str | torch.device = "auto", labels_files=None,
                 checkpoint=None, progress=True, log: Callable[[str], None] = print) -> dict:
    """Train (or with `checkpoint`, only score) one classifier per variant; write every output to `out`."""
    from lungmask_kit.runtime import prepare_device

    t0 = time.perf_counter()
    manifest, out = Path(manifest), Path(out)
    if not manifest.is_file():
        raise LungkitError(f"manifest not found: {manifest}")
    Normalization(settings.normalize), Channels(settings.channels)  # a wrong value fails here, not mid-run
    device = prepare_device(device)
    out.mkdir(parents=True, exist_ok=True)
    samples, info = load_samples(manifest, settings, labels_files)
    for variant in settings.variants:
        missing = [s.image for s in samples if variant not in s.files]
        if missing:
            raise LungkitError(f"{len(missing)} image(s) have no {variant!r} file in {manifest} (e.g. {missing[0]}); "
                               "make the variants with lungkit segment or lungkit variants")
    if checkpoint is not None:
        train, test, how = [], samples, "all eligible rows (evaluation only)"
        if any(s.split for s in samples):
            test = [s for s in samples if s.split == "test"] or samples
            how = "test split" if test is not samples else how
    else:
        train, test, how = split_samples(samples, settings.test_fraction, settings.seed)
    log(f"{len(samples)} images ({info['positive']!r} positive: {sum(s.label for s in samples)}); "
        f"train {len(train)}, test {len(test)} ({how})")
    cache = _ImageCache(settings.image_size)
    metrics, predictions = {}, []
    for variant in settings.variants:
        if checkpoint is not None:
            model, config, _ = load_model(checkpoint, device)
            if config.task != "classification":
                raise LungkitError(f"{checkpoint} is not a classifier checkpoint")
            cache = _ImageCache(config.input_size) if cache.size != config.input_size else cache
            ds = _ClassifyDataset(test, variant, cache, config.mean, config.std, config.in_channels, augment=False)
            probs = _predict(model.to(memory_format=torch.channels_last), ds, device, settings.batch_size)
            m = binary_classification_metrics([s.label for s in test], probs, config.threshold)
        else:
            m, probs = train_variant(variant, train, test, settings, cache, device, out, progress, log)
        metrics[variant] = m
        predictions += [
            {"variant": variant, "image": s.image, "patient_id": s.patient_id, "label": s.label,
             "probability": float(p), "prediction": int(p >= m["threshold"])}
            for s, p in zip(test, probs)
        ]
    _write_outputs(out, metrics, predictions, settings, info, how, len(train), len(test), time.perf_counter() - t0, checkpoint)
    return {"metrics": metrics, "seconds": time.perf_counter() - t0, "n_train": len(train), "n_test": len(test), "info": info}


# ---------------------------------------------------------------- outputs


def comparison_table(metrics: dict, settings: ClassifySettings) -> str:
    head = "| variant | normalisation | channels | accuracy | sensitivity | specificity | precision | recall | F1 | ROC AUC | n |"
    lines = [head, "|" + "---|" * 11]
    for variant, m in metrics.items():
        auc = "n/a" if m["roc_auc"] is None else f"{m['roc_auc']:.3f}"
        lines.append(
            f"| {variant} | {settings.normalize} | {settings.channels} | {m['accuracy']:.3f} | {m['sensitivity']:.3f} | "
            f"{m['specificity']:.3f} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {auc} | {m['n']} |"
        )
    return "\n".join(lines)


def _roc_curves(metrics: dict, predictions: list[dict]) -> dict:
    """{variant: (fpr, tpr, auc)} for the variants whose test split holds both classes."""
    curves = {}
    for variant, m in metrics.items():
        labels = [p["label"] for p in predictions if p["variant"] == variant]
        probs = [p["probability"] for p in predictions if p["variant"] == variant]
        if len(set(labels)) == 2:
            fpr, tpr = roc_curve(labels, probs)
            curves[variant] = (fpr, tpr, m["roc_auc"])
    return curves


def _write_outputs(out, metrics, predictions, settings, info, how, n_train, n_test, seconds, checkpoint) -> None:
    import pyarrow as pa

    from lungmask_kit.manifest import write_table

    atomic_write_bytes(out / "metrics.json", json.dumps(metrics, indent=2).encode())
    schema = pa.schema([("variant", pa.string()), ("image", pa.string()), ("patient_id", pa.string()),
                        ("label", pa.int8()), ("probability", pa.float64()), ("prediction", pa.int8())])
    write_table(pa.Table.from_pylist(predictions, schema=schema), out / "predictions.parquet")
    from lungmask_kit.plots import metrics_png, roc_png

    atomic_write_bytes(out / "roc.png", roc_png(_roc_curves(metrics, predictions)))
    atomic_write_bytes(out / "metrics.png", metrics_png(metrics))
    report = [
        "# lungkit classify results", "",
        f"Positive class: `{info['positive']}` vs the rest ({', '.join(info['labels'])}). "
        f"Train {n_train} / test {n_test} images, split {how}. Architecture `{settings.arch}` "
        f"({'ImageNet-pretrained' if settings.pretrained else 'from scratch'}), {settings.image_size} px, "
        f"{settings.epochs} epochs, seed {settings.seed}, threshold {settings.threshold}. "
        f"Excluded: {info['excluded_error']} failed, {info['excluded_qc']} QC-flagged, {info['excluded_unlabelled']} unlabelled rows."
        + (f" Scored with checkpoint `{checkpoint}`." if checkpoint else ""),
        "", comparison_table(metrics, settings), "", "![ROC per variant](roc.png) ![Metrics per variant](metrics.png)", "",
        f"Time: {seconds:.0f} s.", "",
        "If lungs-removed images score about as well as lungs-only ones, the classifier relies on what lies outside "
        "the lungs (source, text, devices, image style) rather than on lung findings.",
    ]
    atomic_write_bytes(out / "results.md", ("\n".join(report) + "\n").encode())

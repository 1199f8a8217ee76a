"""The classifier audit's data: settings, samples from a manifest (label, patient, split, source, lung mask),
patient-level splits, and the image cache every model of a run shares.

The cache holds each image resized to `image_size` and scaled to [0, 1] as uint16 (1/65535 steps), in RAM or
in a memory-mapped file under the output folder (`--cache disk`), filled by threads; both give the same
numbers, and the disk one keeps memory flat for 100k+ images.
"""

from __future__ import annotations

import random
import shutil
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from lungmask_kit.choices import Channels, Normalization, Precision
from lungmask_kit.classify.grouping import SYNTHETIC, group_copies, patients_from_paths
from lungmask_kit.derive import binarize_mask
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import OutsidePathError
from lungmask_kit.imaging import ImageDecodeError, read_gray, to_unit_range
from lungmask_kit.labels import match_labels, read_labels
from lungmask_kit.manifest import RunManifest, open_run
from lungmask_kit.runtime import available_cores

VARIANT_COLUMNS = {"original": None, "lungs": "lungs_path", "nolungs": "nolungs_path"}


@dataclass
class ClassifySettings:
    variants: tuple[str, ...] = ("original", "lungs", "nolungs")
    normalize: str = "dataset"  # dataset | imagenet
    channels: str = "gray"  # gray | rgb
    arch: str = "resnet18"
    pretrained: bool = False
    init: str = "scratch"  # scratch | imagenet | segmenter (the bundled segmenter's DenseNet121 encoder)
    image_size: int = 224
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    seeds: int = 3  # models per variant (seed, seed+1, ...); the split stays that of `seed`
    bootstrap: int = 1000  # patient-level bootstrap replicates for the 95% intervals
    saliency: bool = True  # Grad-CAM share inside the lungs
    leakage: bool = True  # source prediction and leave-one-source-out, when the manifest has a source column
    cache: str = "memory"  # memory | disk (memory-mapped)
    test_fraction: float = 0.2
    positive: str | None = None
    include_flagged: bool = False
    labels_from_folders: bool = False
    precision: str = "auto"  # auto | fp32 | bf16: training and scoring (runtime.training_autocast); Grad-CAM in fp32
    patient_from: str | None = None  # --patient-from REGEX: patient ids from the image paths
    input_root: str | None = None  # where the manifest's original images are now (--input-root)
    threshold: float = 0.5

    @property
    def seed_list(self) -> list[int]:
        return [self.seed + k for k in range(max(1, self.seeds))]

    def __post_init__(self) -> None:  # a wrong value fails here, not mid-run
        for name, kind in (("normalize", Normalization), ("channels", Channels), ("precision", Precision)):
            value = getattr(self, name)
            if value not in {k.value for k in kind}:
                raise LungkitError(f"{name} must be one of {', '.join(k.value for k in kind)} (got {value!r})")


@dataclass
class Sample:
    image: str  # manifest path (the row key)
    patient_id: str
    label: int
    split: str
    files: dict[str, Path] = field(default_factory=dict)  # variant -> file
    source: str | None = None
    mask: Path | None = None  # the lung mask, for saliency_in_lungs
    sha256: str | None = None  # of the original file: exact copies are one pseudo-patient


def load_samples(manifest: Path, settings: ClassifySettings, labels_files: list | None = None) -> tuple[list[Sample], dict]:
    """Eligible rows of a segment/variants manifest as samples with integer labels. Returns (samples, info)."""
    run = open_run(manifest, settings.input_root)  # a damaged or foreign file is one line, not a traceback
    manifest, rows = run.path, run.table.to_pylist()
    if labels_files:
        matched, _, _ = match_labels([r["path"] for r in rows], read_labels(labels_files))
        for r in rows:
            if r["path"] in matched:
                m = matched[r["path"]]
                r.update(label=m.label, patient_id=m.patient_id or r.get("patient_id"), split=m.split or r.get("split"),
                         source=dict(m.extra).get("source") or r.get("source"))
    if settings.labels_from_folders:
        for r in rows:
            parts = r["path"].split("/")
            r["label"] = parts[0] if len(parts) > 1 else None
    labels = sorted({r["label"] for r in rows if r.get("label")})
    if len(labels) < 2:
        raise LungkitError(f"{manifest}: need at least two labels (found {labels}); attach them with --labels or --labels-from-folders")
    positive = settings.positive or next((lab for lab in labels if "covid" in lab.lower() or "positive" in lab.lower()), None)
    if positive not in labels:
        raise LungkitError(f"positive label {positive!r} not among the labels {labels}; choose one with --positive")
    info = {"rows": len(rows), "excluded_error": 0, "excluded_qc": 0, "excluded_unlabelled": 0, "excluded_outside": 0}
    if settings.patient_from:
        derived = patients_from_paths([r["path"] for r in rows], settings.patient_from)
        for r in rows:
            r["patient_id"] = derived.get(r["path"])
    samples = [s for s in (_sample(r, run, positive, settings, info) for r in rows) if s]
    info.update(positive=positive, labels=labels, n=len(samples), grouping=_group_unknown_patients(samples, settings))
    return samples, info


def _group_unknown_patients(samples: list[Sample], settings: ClassifySettings) -> str:
    """Pseudo-patients for the samples without a patient id (exact and near copies together); says how."""
    unknown = [s for s in samples if s.patient_id.startswith(SYNTHETIC)]
    known = len(samples) - len(unknown)
    source = f"--patient-from {settings.patient_from!r}" if settings.patient_from else "the patient_id column"
    if not unknown:
        return f"patients from {source} ({len({s.patient_id for s in samples})} patients)"
    groups, grouping = group_copies([s.image for s in unknown], [s.sha256 for s in unknown],
                                    [s.files["original"] for s in unknown])
    for s in unknown:
        s.patient_id = groups[s.image]
    said = f"{known} image(s) with a patient id from {source}; " if known else ""
    return said + grouping.how


def _sample(r: dict, run: RunManifest, positive: str, settings: ClassifySettings, info: dict):
    if r["status"] != "ok":
        info["excluded_error"] += 1
        return None
    if r.get("qc_pass") is False and not settings.include_flagged:
        info["excluded_qc"] += 1
        return None
    if not r.get("label"):
        info["excluded_unlabelled"] += 1
        return None
    try:  # a manifest's paths are untrusted: none may lead out of the folder it belongs to
        files = {"original": run.input_file(r["path"])}
        for variant, col in VARIANT_COLUMNS.items():
            if col and r.get(col):
                files[variant] = run.output_file(r[col])
        mask = run.mask_file(r["mask_path"]) if r.get("mask_path") else None
    except OutsidePathError:
        info["excluded_outside"] += 1
        return None
    return Sample(r["path"], r.get("patient_id") or f"{SYNTHETIC}{r['path']}", int(r["label"] == positive),
                  (r.get("split") or "").strip().lower(), files, r.get("source") or None, mask, r.get("sha256"))


TRAIN_SPLITS = ("train", "val", "valid", "validation")


def split_samples(samples: list[Sample], test_fraction: float, seed: int) -> tuple[list[Sample], list[Sample], str]:
    """(train, test, how). A split column is used as is; otherwise whole patients, stratified by label."""
    if any(s.split for s in samples):
        train = [s for s in samples if s.split in TRAIN_SPLITS]
        test = [s for s in samples if s.split == "test"]
        left = Counter(s.split or "(blank)" for s in samples if s.split not in TRAIN_SPLITS and s.split != "test")
        how = "given split column"
        if left:
            how += (f"; {sum(left.values())} image(s) left out, whose split is neither train/val nor test: "
                    + ", ".join(f"{n} {v!r}" for v, n in left.most_common()))
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


class ImageCache:
    """Every file a run's models read, resized and scaled once: uint16 (n, size, size) per variant, in RAM or
    memory-mapped from `folder`. Rows are filled by `workers` threads the first time a variant is asked for."""

    SCALE = 65535.0

    def __init__(self, size: int, folder: Path | None = None, workers: int = 0):
        self.size, self.folder, self.workers = size, folder, workers
        self._arrays: dict[str, np.ndarray] = {}
        self._index: dict[str, dict[Path, int]] = {}

    def rows(self, variant: str, samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
        """(the variant's uint16 array, the samples' row numbers in it): read per item, so a memory-mapped cache
        is never loaded whole."""
        self._ensure(variant, samples)
        return self._arrays[variant], np.array([self._index[variant][s.files[variant]] for s in samples], np.int64)

    def mean_std(self, variant: str, samples: list[Sample], chunk: int = 256) -> tuple[float, float]:
        """Pixel mean and std in [0, 1] over the samples' images (exact, in chunks)."""
        array, rows = self.rows(variant, samples)
        total = total_sq = 0.0
        for k in range(0, len(rows), chunk):
            x = array[np.sort(rows[k:k + chunk])].astype(np.float64) / self.SCALE
            total += float(x.sum())
            total_sq += float(np.square(x).sum())
        count = len(rows) * self.size * self.size
        mean = total / count
        return mean, max(float(np.sqrt(max(total_sq / count - mean * mean, 0.0))), 1e-6)

    def _ensure(self, variant: str, samples: list[Sample]) -> None:
        index = self._index.setdefault(variant, {})
        missing = list(dict.fromkeys(s.files[variant] for s in samples if s.files[variant] not in index))
        if not missing:
            return
        old = self._arrays.get(variant)
        n_old = 0 if old is None else len(old)
        array = self._allocate(variant, n_old + len(missing))
        if old is not None:
            array[:n_old] = old
        with ThreadPoolExecutor(self.workers or available_cores(), thread_name_prefix="lungkit-cache") as pool:
            for k, pixels in enumerate(pool.map(self._load, missing)):
                array[n_old + k] = pixels
                index[missing[k]] = n_old + k
        self._arrays[variant] = array

    def _allocate(self, variant: str, n: int) -> np.ndarray:
        shape = (n, self.size, self.size)
        if self.folder is None:
            return np.zeros(shape, np.uint16)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{variant}-{self.size}-{n}.u16"
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=shape)

    def _load(self, path: Path) -> np.ndarray:
        try:
            pixels = read_gray(path)
        except (OSError, ImageDecodeError) as err:
            raise LungkitError(f"cannot read {path}: {err}") from err
        small = cv2.resize(pixels, (self.size, self.size), interpolation=cv2.INTER_AREA)
        return np.rint(to_unit_range(small) * self.SCALE).astype(np.uint16)

    def close(self) -> None:
        """Drop the arrays (and the memory-mapped files)."""
        self._arrays.clear()
        self._index.clear()
        if self.folder is not None and self.folder.is_dir():

            shutil.rmtree(self.folder, ignore_errors=True)


def lung_masks(samples: list[Sample], size: int) -> np.ndarray | None:
    """(n, size, size) bool lung masks of the samples at model size; None when any sample has no mask file."""

    if any(s.mask is None for s in samples):
        return None
    out = np.zeros((len(samples), size, size), bool)
    for i, s in enumerate(samples):
        try:
            mask = binarize_mask(read_gray(s.mask)).astype(np.uint8)
        except (OSError, ImageDecodeError, ValueError):
            return None
        out[i] = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
    return out

"""Segmentation training data: image/mask pairs from folders or a CSV, patient-level splits, a cached dataset."""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from lungmask_kit import defaults
from lungmask_kit.choices import CONVENTIONS
from lungmask_kit.discovery import find_images, stem_key
from lungmask_kit.errors import LungkitError
from lungmask_kit.imaging import read_gray, read_model_view, to_unit_range


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path
    patient_id: str | None = None
    split: str | None = None  # "train" | "val" | "test" when the data says so
    convention: str = defaults.CONVENTION  # which lung the mask outlines (choices.Convention)
    heart: Path | None = None  # a heart mask of the same image, where the data has one


def _match_folder(images: Path, masks: Path, split: str | None, convention: str, hearts: Path | None = None,
                  patients: dict[str, str] | None = None) -> list[Pair]:
    mask_by_stem = {stem_key(m): m for m in find_images(masks)}
    heart_by_stem = {stem_key(m): hearts / m for m in find_images(hearts)} if hearts else {}
    patients = patients or {}
    pairs, missing = [], []
    for rel in find_images(images):
        m = mask_by_stem.get(stem_key(rel))
        if m is None:
            missing.append(rel)
        else:
            pairs.append(Pair(images / rel, masks / m, patients.get(stem_key(rel)), split, convention,
                              heart_by_stem.get(stem_key(rel))))
    if missing:
        raise LungkitError(f"{len(missing)} image(s) under {images} have no mask in {masks}, e.g. {missing[0]}")
    return pairs


def _read_csv(path: Path, convention: str) -> list[Pair]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or not {"image", "mask"} <= set(rows[0]):
        raise LungkitError(f"{path}: a training CSV needs 'image' and 'mask' columns "
                           "(optional: patient_id, split, convention, heart)")
    bad = next((r["convention"] for r in rows if (r.get("convention") or convention) not in CONVENTIONS), None)
    if bad is not None:
        raise LungkitError(f"{path}: unknown convention {bad!r} (use {' or '.join(CONVENTIONS)})")
    base = path.parent
    return [
        Pair(base / r["image"], base / r["mask"], r.get("patient_id") or None, r.get("split") or None,
             r.get("convention") or convention, base / r["heart"] if r.get("heart") else None) for r in rows
    ]


def _folder_patients(data: Path) -> dict[str, str]:
    """{image stem: patient id} from the folder's pairs.csv (a `patient_id` column beside `name` or `image`), as
    the shared data and lungkit's own examples ship it; empty where there is none. An image the file does not name
    gets no patient id, and the split then falls back to images (and says so)."""
    path = data / "pairs.csv"
    if not path.is_file():
        return {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        column = next((c for c in ("name", "image") if c in (reader.fieldnames or [])), None)
        if column is None or "patient_id" not in (reader.fieldnames or []):
            return {}
        return {stem_key(r[column]): r["patient_id"] for r in reader if r.get(column) and r.get("patient_id")}


_QU_SPLITS = {"train": "train", "val": "val", "test": "test"}


def find_pairs(data: str | Path, convention: str = defaults.CONVENTION) -> list[Pair]:
    """Pairs from `images/` + `masks/` (+ `heart/` heart masks, and patient ids from a `pairs.csv` beside them,
    where there), the COVID-QU-Ex layout, or a CSV of
    image,mask[,patient_id,split,convention,heart]; `convention` is what the masks outline where the CSV does
    not say."""
    data = Path(data)
    if data.is_file():
        return _read_csv(data, convention)
    if not data.is_dir():
        raise LungkitError(f"training data not found: {data}")
    if (data / "images").is_dir() and (data / "masks").is_dir():
        hearts = data / "heart" if (data / "heart").is_dir() else None
        return _match_folder(data / "images", data / "masks", None, convention, hearts, _folder_patients(data))
    # COVID-QU-Ex: <root>/{Train,Val,Test}/<class>/{images,lung masks}
    pairs: list[Pair] = []
    for split_dir in sorted(p for p in data.iterdir() if p.is_dir() and p.name.lower() in _QU_SPLITS):
        for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
            if (class_dir / "images").is_dir() and (class_dir / "lung masks").is_dir():
                pairs += _match_folder(class_dir / "images", class_dir / "lung masks", _QU_SPLITS[split_dir.name.lower()],
                                       convention)
    if not pairs:
        raise LungkitError(
            f"{data}: expected images/ and masks/, the COVID-QU-Ex layout (Train|Val|Test/<class>/images|lung masks) "
            "or a CSV file with image and mask columns"
        )
    return pairs


def split_pairs(pairs: list[Pair], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair], bool]:
    """(train, val, by_patient). A split given by the data wins; otherwise whole patients go to validation."""
    if any(p.split for p in pairs):
        return [p for p in pairs if p.split == "train"], [p for p in pairs if p.split == "val"], True
    by_patient = all(p.patient_id for p in pairs)
    groups: dict[str, list[Pair]] = {}
    for i, p in enumerate(pairs):
        groups.setdefault(p.patient_id if by_patient else f"#{i}", []).append(p)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    target = round(val_fraction * len(pairs))
    val: list[Pair] = []
    val_keys = set()
    for k in keys:
        if len(val) >= target:
            break
        val += groups[k]
        val_keys.add(k)
    train = [p for k in sorted(groups) if k not in val_keys for p in groups[k]]
    return train, val, by_patient


def data_sources(data: str | Path | list, conventions: list[str]) -> list[list[Pair]]:
    """The pairs of each data argument, in its convention: `conventions` has one for all data or one per data."""
    data = [data] if isinstance(data, (str, Path)) else list(data)
    conventions = list(conventions) * len(data) if len(conventions) == 1 else list(conventions)
    if len(conventions) != len(data):
        raise LungkitError(f"give one --convention for all data or one per data argument "
                           f"({len(data)} data, {len(conventions)} conventions)")
    return [find_pairs(d, c) for d, c in zip(data, conventions)]


def split_sources(sources: list[list[Pair]], val_fraction: float, seed: int) -> tuple[list[Pair], list[Pair], bool]:
    """`split_pairs` on each source alone, then joined: a collection's validation patients are the same whether
    it is trained alone or beside others (so a model fine-tuned on more data never sees its parent's)."""
    train: list[Pair] = []
    val: list[Pair] = []
    by_patient = True
    for pairs in sources:
        t, v, p = split_pairs(pairs, val_fraction, seed)
        train, val, by_patient = train + t, val + v, by_patient and p
    return train, val, by_patient


UNSUPERVISED = -1.0  # target value of an output channel the image has no mask for (another convention, no heart)


def _small_mask(path: Path, shape: tuple[int, int], size: int) -> np.ndarray:
    mask = read_gray(path)
    if mask.shape != shape:
        raise LungkitError(f"{path}: mask size {mask.shape[::-1]} differs from image size {shape[::-1]}")
    # area-average the binary mask, then threshold at half: the same boundary a 0.5 probability gives
    m = cv2.resize((mask > mask.max() / 2).astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return (m >= 0.5).astype(np.uint8)


def load_pair(pair: Pair, size: int) -> tuple[np.ndarray, np.ndarray]:
    """-> image (size, size) float32 in [0, 1], lung mask (size, size) uint8 in {0, 1}."""
    image = read_model_view(pair.image)
    small = to_unit_range(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
    return small, _small_mask(pair.mask, image.shape, size)


def load_heart(pair: Pair, size: int) -> np.ndarray | None:
    """The pair's heart mask at (size, size) uint8 in {0, 1}, or None where it has none."""
    if pair.heart is None:
        return None
    return _small_mask(pair.heart, read_gray(pair.image).shape, size)


class PairDataset(Dataset):
    """All pairs resized once and cached in memory (337 pairs at 256 px is ~40 MB). Targets are (K, S, S), one
    channel per model output (`ModelConfig.outputs`): the pair's own convention holds its lung mask, "heart"
    its heart mask where it has one, the others `UNSUPERVISED`."""

    def __init__(self, pairs: list[Pair], size: int, in_channels: int, transform, outputs: list[str] | None = None):
        self.pairs = pairs
        self.in_channels = in_channels
        self.transform = transform
        self.outputs = outputs or [defaults.CONVENTION]
        missing = sorted({p.convention for p in pairs} - set(self.outputs))
        if missing:
            raise LungkitError(f"the model has no output for masks in the {', '.join(missing)} convention")
        if any(p.heart for p in pairs) and "heart" not in self.outputs:
            raise LungkitError("the data has heart masks but the model has no heart output")
        loaded = [self._load(p, size) for p in pairs]
        self.images = torch.from_numpy(np.stack([x for x, _ in loaded]))[:, None] if loaded else torch.empty(0)
        self.targets = torch.from_numpy(np.stack([t for _, t in loaded])) if loaded else torch.empty(0)

    def _load(self, pair: Pair, size: int) -> tuple[np.ndarray, np.ndarray]:
        image, lungs = load_pair(pair, size)
        target = np.full((len(self.outputs), size, size), UNSUPERVISED, np.float32)
        target[self.outputs.index(pair.convention)] = lungs
        heart = load_heart(pair, size)
        if heart is not None:
            target[self.outputs.index("heart")] = heart
        return image, target

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        from lungmask_kit.training.augment import apply_pair

        image = self.images[i].expand(self.in_channels, -1, -1)
        # unsupervised channels are shifted to {0, 1} (a constant 0) for the geometric transforms, then put back
        target = self.targets[i]
        supervised = target[:, 0, 0] >= 0
        image, moved = apply_pair(self.transform, image, target.clamp_min(0).to(torch.uint8))
        moved = moved.float()
        moved[~supervised] = UNSUPERVISED
        return image, moved

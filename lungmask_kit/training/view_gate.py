"""Fit the view gate (`quality.ViewGate`): frontal chest radiographs against the kinds of image that are not.

Frontal images are the calibration data's (every collection given); the others come from `calibrate --negatives
FOLDER` (lateral radiographs, CT or MR slices, anything else: a subfolder named after its kind says which) and from
the pictures the installed imaging packages ship (scikit-image's photographs and micrographs, pydicom's CT and MR
test slices, matplotlib's and scikit-learn's samples): nothing is downloaded. Every image is also seen through
acquisition augmentations (film or digital contrast, gamma, blur, noise, borders, burnt-in text, rotation, crop),
so that what separates the classes is the view, not a collection's look: a density of the same features, fitted
on the training collections, flagged clean frontal CXRs of collections it had not seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np

from lungmask_kit.decoder_warnings import WarningTally
from lungmask_kit.dicom import is_lateral
from lungmask_kit.discovery import find_images
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import InputReadError
from lungmask_kit.imaging import ImageDecodeError, read_decoded, to_unit_range
from lungmask_kit.quality import FRONTAL, VIEW_CLASSES, ViewGate

C = 0.01  # inverse L2 strength of the logistic head; chosen leave-one-collection-out (bench_view_gate.py)
COMPONENTS = 256  # PCA dimensions the head is fitted in (folded back into one linear map for inference)
FRONTAL_COPIES = 1  # acquisition-augmented copies of each frontal image
NEGATIVE_COPIES = 7  # ... and of each other image (there are few of them)
MIN_SIDE = 32  # smaller pictures (pydicom's 3x3 test files) say nothing about a view
CROSS_SECTIONAL_MODALITIES = {"CT", "MR", "PT"}  # a DICOM negative of these modalities is cross-sectional


@dataclass(frozen=True)
class Negative:
    """An image that is not a frontal chest radiograph, and which kind it is (VIEW_CLASSES after frontal); None:
    its DICOM header says (`kind_from_header`)."""

    path: Path
    kind: str | None = None
    packaged: bool = False  # one of package_negatives() (pydicom ships unreadable test files on purpose)


def kind_from_header(header: dict) -> str:
    """A non-frontal image's kind from its DICOM header columns (imaging.DecodedImage.header): a CT, MR or PET
    modality is cross-sectional, a lateral ViewPosition lateral; anything else, or no header, other."""
    if header.get("modality") in CROSS_SECTIONAL_MODALITIES:
        return "cross-sectional"
    return "lateral" if is_lateral(header.get("view")) else "other"


def negatives_in(folder: str | Path) -> list[Negative]:
    """Every image under `folder`; its kind is the first folder on its path named after one (lateral/,
    cross-sectional/, other/), else what its DICOM header says, else "other"."""
    folder = Path(folder)
    kinds = set(VIEW_CLASSES[1:])
    found = []
    for relative in find_images(folder, dicom=True):
        kind = next((part for part in Path(relative).parts[:-1] if part in kinds), None)
        found.append(Negative(folder / relative, kind))
    return found


def package_negatives() -> list[Negative]:
    """The sample pictures installed with scikit-image, pydicom, matplotlib and scikit-learn (base dependencies):
    pydicom's test files of the kind their headers give (its CT and MR slices cross-sectional), the rest other."""
    import matplotlib
    import pydicom
    import skimage
    import sklearn

    found = [Negative(p, "other") for p in sorted(Path(skimage.__file__).parent.glob("data/*"))
             if p.suffix in (".png", ".jpg")]
    found += [Negative(p) for p in sorted(Path(pydicom.__file__).parent.glob("data/test_files/*.dcm"))]
    found += [Negative(p, "other") for p in [Path(matplotlib.__file__).parent / "mpl-data/sample_data/grace_hopper.jpg",
                                             *sorted(Path(sklearn.__file__).parent.glob("datasets/images/*.jpg"))]]
    return [Negative(n.path, n.kind, True) for n in found if n.path.is_file()]


_TEXT = ("L", "R", "AP", "PA", "PORTABLE", "SUPINE", "ERECT", "12/03")


def acquisition_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(H, W) uint8/uint16 -> (H', W') uint8: the same picture as another site might store it (crop, rotation and
    scale, gamma and contrast range, blur, noise, borders, burnt-in text). The input is not changed."""
    x = to_unit_range(image)
    h, w = x.shape
    top, bottom, left, right = rng.uniform(0, 0.12, 4)
    x = x[int(top * h):h - int(bottom * h), int(left * w):w - int(right * w)]
    h, w = x.shape
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-10, 10), rng.uniform(0.9, 1.1))
    x = cv2.warpAffine(x, turn, (w, h), borderMode=cv2.BORDER_CONSTANT, borderValue=float(rng.choice([0, 1, x.mean()])))
    # a wider display window (black level to 0.45, white from 0.6) flagged one more unseen CT slice in
    # bench_view_gate.py but let a synthetic two-ellipse picture pass as frontal: kept as the bundled gate was fitted
    low, high = rng.uniform(0, 0.15), rng.uniform(0.8, 1.0)
    x = low + (high - low) * np.clip(x, 0, 1) ** rng.uniform(0.6, 1.7)
    if rng.random() < 0.3:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(0.5, 2.0))
    if rng.random() < 0.5:
        x = x + rng.normal(0, rng.uniform(0.005, 0.04), x.shape).astype(np.float32)
    if rng.random() < 0.4:
        sides = (rng.uniform(0, 0.1, 4) * [h, h, w, w]).astype(int)
        x = cv2.copyMakeBorder(x, *sides.tolist(), cv2.BORDER_CONSTANT, value=float(rng.choice([0, 1])))
    out = (np.clip(x, 0, 1) * 255).astype(np.uint8)
    if rng.random() < 0.4:
        h, w = out.shape
        for _ in range(rng.integers(1, 4)):
            cv2.putText(out, str(rng.choice(_TEXT)), (int(rng.uniform(0, 0.8) * w), int(rng.uniform(0.05, 1) * h)),
                        cv2.FONT_HERSHEY_SIMPLEX, rng.uniform(0.3, 1.5) * w / 500, int(rng.choice([0, 255])),
                        max(1, w // 300))
    return out


def pooled_of(segmenter, images: Sequence[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """(N, D) pooled encoder features of decoded images (the view the gate scores at run time)."""
    parts = [segmenter.predict_batch(np.stack([segmenter.prepare(im) for im in images[i:i + batch_size]])).pooled
             for i in range(0, len(images), batch_size)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def augmented_pooled(segmenter, images: Sequence[np.ndarray], copies: int, rng: np.random.Generator) -> np.ndarray:
    """(N * copies, D) features of acquisition-augmented copies of `images`."""
    return pooled_of(segmenter, [acquisition_augment(im, rng) for im in images for _ in range(copies)])


def read_negative(negative: Negative) -> tuple[np.ndarray, str]:
    """(the image as the segmenter sees it, its kind). Raises as imaging.read_decoded does."""
    decoded = read_decoded(negative.path)
    return decoded.model_view, negative.kind or kind_from_header(decoded.header)


def read_negatives(negatives: Sequence[Negative]) -> tuple[list[np.ndarray], list[str], list[str]]:
    """The negatives' images and kinds, and what could not be read: a user's file is named there, a package's
    small or unreadable test file (pydicom ships broken ones on purpose) skipped."""
    images, kinds, unreadable = [], [], []
    with WarningTally(c_stderr=False):  # counted, not printed: pydicom's odd test files warn by design
        for n in negatives:
            try:
                image, kind = read_negative(n)
            except (OSError, InputReadError, ImageDecodeError, ValueError) as err:
                if not n.packaged:
                    unreadable.append(f"{n.path.name} ({err})")
                continue
            if min(image.shape) >= MIN_SIDE:
                images.append(image)
                kinds.append(kind)
    return images, kinds, unreadable


def view_features(segmenter, frontal: Sequence[Path], negatives: Sequence[Negative], log: Callable[[str], None],
                  read: Callable[[Path], np.ndarray], seed: int = 0, chunk: int = 16) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """What the view gate is fitted on besides the frontal images' own features (which calibration already has):
    the augmented copies of the frontal images, and the negatives with theirs. Images are read and dropped a
    chunk at a time, so memory does not grow with a large --negatives folder. Returns (frontal copies,
    negatives: their own features, then their copies', the negatives' kinds in that order)."""
    rng = np.random.default_rng(seed)
    copies = [augmented_pooled(segmenter, [read(p) for p in frontal[i:i + chunk]], FRONTAL_COPIES, rng)
              for i in range(0, len(frontal), chunk)]
    own, varied, kinds, varied_kinds, unreadable = [], [], [], [], []
    for i in range(0, len(negatives), chunk):
        images, chunk_kinds, failed = read_negatives(negatives[i:i + chunk])
        unreadable += failed
        if images:
            own.append(pooled_of(segmenter, images))
            varied.append(augmented_pooled(segmenter, images, NEGATIVE_COPIES, rng))
            kinds += chunk_kinds
            varied_kinds += [k for k in chunk_kinds for _ in range(NEGATIVE_COPIES)]
    if unreadable:
        log(f"{len(unreadable)} negative image(s) could not be read and are left out, e.g. {unreadable[0]}")
    if not kinds:
        raise LungkitError("none of the --negatives images could be read")
    return np.concatenate(copies), np.concatenate(own + varied), kinds + varied_kinds


def fit_view_gate(frontal_train: np.ndarray, frontal_val: np.ndarray, negatives: np.ndarray,
                  kinds: Sequence[str]) -> ViewGate:
    """A multinomial logistic head, frontal against each kind of negative present, in the PCA subspace of the
    standardised features. Frontal and non-frontal images weigh the same in total, so the edge (score 1) is
    where "not frontal" becomes the more likely; `center` (score 0) is the median validation frontal image."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression

    classes = (FRONTAL, *[k for k in VIEW_CLASSES[1:] if k in set(kinds)])
    if len(classes) < 2:
        raise ValueError("a view gate needs images that are not frontal chest radiographs")
    x = np.concatenate([frontal_train, negatives]).astype(np.float64)
    y = np.array([0] * len(frontal_train) + [classes.index(k) for k in kinds])
    weight = np.where(y == 0, 0.5 / len(frontal_train), 0.5 / len(negatives)) * len(y)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    pca = PCA(min(COMPONENTS, len(x) - 1), random_state=0).fit((x - mean) / scale)
    head = LogisticRegression(C=C, max_iter=3000).fit(pca.transform((x - mean) / scale), y, sample_weight=weight)
    coef, intercept = head.coef_, head.intercept_
    if len(classes) == 2:  # sklearn keeps one row for two classes: softmax over (-z/2, z/2) is sigmoid(z)
        coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    full = coef @ pca.components_  # (K, D) on the standardised features
    gate = ViewGate(classes, mean, scale, full, intercept - full @ pca.mean_, 0.0, 0.0)
    lp = gate.log_probabilities(frontal_val if len(frontal_val) else frontal_train)
    not_frontal = np.logaddexp.reduce(lp[:, 1:], axis=1) - lp[:, 0]
    gate.center = float(np.median(not_frontal))
    gate.edge = max(0.0, gate.center + 1.0)  # a head that cannot separate its classes still gets a finite scale
    return gate

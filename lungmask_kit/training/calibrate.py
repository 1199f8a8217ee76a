"""Fit a segmenter's input gate and est_dice regressor and store them with its weights.

The image gate (a view classifier with `--negatives`, else a density) and the shape statistics come from the
training images; thresholds and the est_dice regressor come from validation patients, whose masks the model
never saw, so their Dice against the annotation is the honest target. `lungkit train` runs this on its own
split; `lungkit calibrate` refits an existing model (the bundled default included) without retraining.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lungmask_kit import defaults
from lungmask_kit.derive import binarize_mask
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import inside, staged_folder
from lungmask_kit.imaging import ImageDecodeError, read_gray, read_model_view
from lungmask_kit.inference import Segmenter
from lungmask_kit.metrics import dice
from lungmask_kit.models.modeling import (
    DEFAULT_WEIGHTS,
    _config_path,
    attach_quality,
    load_bundle,
    load_config,
    resolve_weights,
)
from lungmask_kit.postprocess import PostprocessSettings, clean_mask, resize_mask
from lungmask_kit.quality import (
    EST_DICE_FEATURES,
    EST_DICE_TTA_FEATURES,
    PER_CONVENTION,
    SHAPE_FEATURES,
    DiceRegressor,
    ImageDensity,
    QualityModel,
    ShapeModel,
    ViewGate,
    combined_config,
    flip_agreement,
    shape_descriptors,
    uncertainty_descriptors,
)
from lungmask_kit.runtime import prepare_device
from lungmask_kit.training.data import Pair, data_sources, split_sources
from lungmask_kit.training.view_gate import (
    NEGATIVE_COPIES,
    Negative,
    fit_view_gate,
    negatives_in,
    package_negatives,
    view_features,
)

# progress lines go here unless the caller passes `log` (the CLI passes typer.echo); silent by default
logger = logging.getLogger(__name__)

N_COMPONENTS = 128  # PCA dimensions of the image density (fewer with fewer training images)
IMAGE_MARGIN = 1.05  # image gate at 1.05 x the 99th percentile of validation scores
SHAPE_MARGIN = 2.0  # shape gate looser: frontal masks with odd shapes are est_dice's job, not the gate's
RIDGE_ALPHA = 5.0
EST_DICE_FLAG_SHARE = 0.01  # min_est_dice flags about this share of validation images (held-out predictions)


@dataclass
class Observation:
    """One image through the segmenter: what the quality model sees, and its Dice where a truth exists."""

    pooled: np.ndarray
    values: dict[str, float]
    patient: str
    dice: float | None = None
    convention: str | None = None  # the convention of the pair's ground truth


def observe(segmenter, pairs: Sequence[Pair], with_truth: bool, post: PostprocessSettings,
            batch_size: int = 16, progress: bool = False) -> list[Observation]:
    """Run the segmenter (with a mirrored pass) over pairs; Dice at native size after post-processing."""

    out: list[Observation] = []
    for start in tqdm(range(0, len(pairs), batch_size), disable=not progress, unit="batch", leave=False):
        chunk = pairs[start:start + batch_size]
        images = [_read(p.image, read_model_view) for p in chunk]
        pred = segmenter.predict_batch(np.stack([segmenter.prepare(im) for im in images]), tta=True)
        for i, (pair, image) in enumerate(zip(chunk, images)):
            mask = clean_mask(pred.probabilities[i], post)
            values = {**shape_descriptors(mask), **uncertainty_descriptors(pred.probabilities[i], mask, post),
                      "flip_dice": flip_agreement(mask, clean_mask(pred.flipped[i], post))}
            score = None
            if with_truth:
                truth = binarize_mask(_read(pair.mask, read_gray))
                score = dice(resize_mask(mask, image.shape), truth) if truth.shape == image.shape else None
            out.append(Observation(pred.pooled[i], values, pair.patient_id or str(pair.image), score, pair.convention))
    return out


def _read(path, read) -> np.ndarray:
    """An image or mask of the calibration data; one that cannot be read stops the calibration with one line
    (a fit on what is left would no longer be the split the user asked for)."""
    try:
        return read(path)
    except (OSError, ImageDecodeError) as err:
        raise LungkitError(f"cannot read {path}: {err}") from err


def fit_image_density(train: np.ndarray, val: np.ndarray) -> ImageDensity | None:
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    if len(train) < 3:
        return None
    k = min(N_COMPONENTS, len(train) - 1, train.shape[1])
    pca = PCA(k, random_state=0).fit(train)
    z = pca.transform(train)
    lw = LedoitWolf().fit(z)
    residual = ((train - pca.inverse_transform(z)) ** 2).sum(1).mean()
    density = ImageDensity(pca.mean_, pca.components_, lw.location_, lw.precision_, float(max(residual, 1e-12)), 1.0)
    edge = IMAGE_MARGIN * float(np.quantile(density.raw_score(val if len(val) else train), 0.99))
    density.threshold = max(edge, 1.0)  # never tighter than the training images' own mean score (1 by construction)
    return density


def fit_shape(train: list[dict], val: list[dict]) -> ShapeModel:
    from sklearn.covariance import LedoitWolf

    x = np.array([[d[n] for n in SHAPE_FEATURES] for d in train])
    mean, std = x.mean(0), x.std(0) + 1e-3
    precision = LedoitWolf().fit((x - mean) / std).precision_ if len(x) > 1 else np.eye(len(SHAPE_FEATURES))
    model = ShapeModel(mean, std, precision, 1.0)
    scores = [model.raw_score(d) for d in (val or train)]
    # never tighter than the training masks' mean squared distance per descriptor (about 1): a model whose
    # masks all look alike (or are all empty, early in training) would otherwise divide by zero
    model.threshold = max(SHAPE_MARGIN * float(np.quantile(scores, 0.99)), 1.0)
    return model


def _logit(d: np.ndarray) -> np.ndarray:
    d = np.clip(d, 0.5, 0.999)
    return np.log(d / (1 - d))


def fit_regressor(obs: list[Observation], features: tuple[str, ...]) -> DiceRegressor:
    from sklearn.linear_model import Ridge

    x = np.array([[o.values[n] for n in features] for o in obs])
    y = _logit(np.array([o.dice for o in obs]))
    mean, std = x.mean(0), x.std(0) + 1e-6
    ridge = Ridge(alpha=RIDGE_ALPHA).fit((x - mean) / std, y)
    return DiceRegressor(features, mean, std, ridge.coef_, float(ridge.intercept_))


def cross_validate(obs: list[Observation], features: tuple[str, ...]) -> np.ndarray | None:
    """Leave-one-patient-out predictions (None with fewer than 3 patients)."""
    from sklearn.model_selection import LeaveOneGroupOut

    groups = np.array([o.patient for o in obs])
    if len(set(groups)) < 3:
        return None
    pred = np.zeros(len(obs))
    for fit_idx, test_idx in LeaveOneGroupOut().split(obs, groups=groups):
        reg = fit_regressor([obs[i] for i in fit_idx], features)
        for i in test_idx:
            pred[i] = reg.predict(obs[i].values)
    return pred


def _agreement(pred: np.ndarray | None, truth: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    if pred is None:
        return {}
    mae = round(float(np.abs(pred - truth).mean()), 4)
    if np.ptp(pred) == 0 or np.ptp(truth) == 0:  # rank correlation undefined (and NaN is not JSON)
        return {"spearman": None, "mae": mae}
    return {"spearman": round(float(spearmanr(pred, truth)[0]), 4), "mae": mae}


def fit_quality(train: list[Observation], val: list[Observation], image: ImageDensity | None,
                convention: str | None = None, view: ViewGate | None = None) -> QualityModel:
    """The shape statistics and est_dice of one convention, beside an image density fitted once for the shared
    encoder. `val`: every validation image, its masks drawn in `convention`; those whose truth is in that
    convention (all, when None) fit est_dice, and all of them set the thresholds: a frontal CXR of any
    collection is a good frontal CXR, so the shape gate and `min_est_dice` are placed on all of them (placed on
    one homogeneous collection alone, they flagged most CXRs of another; measured in the README). A
    collection is the data argument an image came from (here: its truth's convention)."""
    scored = [o for o in val if o.dice is not None and convention in (None, o.convention)]
    if not scored:
        raise LungkitError("calibration needs validation images with ground-truth masks of the same size")
    shape = fit_shape([o.values for o in train], [o.values for o in val])
    truth = np.array([o.dice for o in scored])
    cv_base, cv_tta = cross_validate(scored, EST_DICE_FEATURES), cross_validate(scored, EST_DICE_TTA_FEATURES)
    base = fit_regressor(scored, EST_DICE_FEATURES)
    # the flag threshold from honest (held-out) predictions where there are enough patients, and the
    # regressor's predictions on the validation images of other collections (no truth in this convention)
    own = cv_base if cv_base is not None else np.array([base.predict(o.values) for o in scored])
    fitted = {id(o) for o in scored}
    others = [o for o in val if id(o) not in fitted]
    reference = np.concatenate([own, [base.predict(o.values) for o in others]])
    # at most about EST_DICE_FLAG_SHARE of each collection's good validation images flagged (the collections'
    # lowest quantile), rounded down to a 0.005 step
    collection = np.array([o.convention for o in scored] + [o.convention for o in others], dtype=object)
    lowest = min(np.quantile(reference[collection == c], EST_DICE_FLAG_SHARE) for c in set(collection))
    min_est_dice = float(np.floor(lowest * 200) / 200)
    model = QualityModel(shape, base, None if view is not None else image, fit_regressor(scored, EST_DICE_TTA_FEATURES),
                         1.0, min_est_dice, view=view)
    flags = [model.assess_values(o.values, o.pooled) for o in val]
    model.report = {
        "n_train_images": len(train), "n_val_images": len(scored), "n_val_patients": len({o.patient for o in scored}),
        "n_val_images_all_collections": len(val),
        "val_dice_mean": round(float(truth.mean()), 4),
        "est_dice_cv": _agreement(cv_base, truth), "est_dice_tta_cv": _agreement(cv_tta, truth),
        "est_dice_cv_method": "leave-one-patient-out on the validation patients",
        "image_gate": model.gate,
        "val_flagged_by_gate": round(float(np.mean([a.ood_score > 1.0 for a in flags])), 4),
        "val_flagged_by_est_dice": round(float(np.mean(reference < min_est_dice)), 4),
    }
    return model


def calibrate(weights: str | Path | None, train_pairs: Sequence[Pair], val_pairs: Sequence[Pair],
              device: torch.device, post: PostprocessSettings | None = None, progress: bool = False,
              log: Callable[[str], None] = logger.info, refit_gate: bool = False,
              negatives: Sequence[Negative] = ()) -> dict[str, QualityModel]:
    """Fit the quality model of `weights` for each convention it draws and store them with the weights (in
    place). The image density comes from every training image (all collections: a frontal CXR is a frontal
    CXR whoever outlined its lungs); each convention's shape statistics from its masks on those images, its
    est_dice from the validation images annotated in it. Returns the models by convention.

    The image gate: with `negatives` (images that are not frontal CXRs), a view gate fitted on them and on every
    calibration image (training/view_gate.py); without, a density of the training images' features. Data in fewer
    conventions than the model draws is fewer collections than it was calibrated on: the stored image gate is
    kept (refitted on one collection, a density flags most clean CXRs of any other) unless `refit_gate` or
    `negatives`."""
    path = resolve_weights(weights) if weights is not None else DEFAULT_WEIGHTS
    config, _ = load_config(path)
    unknown = sorted({p.convention for p in [*train_pairs, *val_pairs]} - set(config.conventions))
    if unknown:
        raise LungkitError(f"the model draws {', '.join(config.conventions)} masks; the data has {', '.join(unknown)} ones")
    fitted = [c for c in config.conventions if any(p.convention == c for p in val_pairs)]
    if not fitted:
        raise LungkitError("calibration needs validation images with ground-truth masks")
    kept = _kept_parts(config, fitted, log)
    stored = None if refit_gate or negatives or not kept else _stored_image_gate(path, config)
    if stored is not None:
        log("the image gate is kept as stored (fitted on more collections than this data covers); --refit-gate fits "
            "it on this data alone, which narrows it to these collections")
    image, view = stored or (None, None)
    post = post or PostprocessSettings(threshold=config.threshold)
    log(f"calibrating the input gate and est_dice on {len(train_pairs)} training / {len(val_pairs)} validation images")
    models = {}
    for convention in fitted:
        # the statistics are fitted in fp32 (bf16 moves est_dice by < 0.0003 and ood_score by < 0.003 here)
        segmenter = Segmenter(path, device, convention, precision="fp32")
        segmenter.quality = None  # the statistics being replaced are not needed (nor required to load)
        train = observe(segmenter, train_pairs, False, post, progress=progress)
        val = observe(segmenter, val_pairs, True, post, progress=progress)
        if stored is None and not models:  # the encoder, and so its features, are the same for every output
            if negatives:
                view = _fit_view_gate(segmenter, train_pairs, train, val, negatives, log)
            else:
                image = fit_image_density(np.array([o.pooled for o in train]), np.array([o.pooled for o in val]))
        models[convention] = fit_quality(train, val, image, convention, view)
        models[convention].report["convention"] = convention
    report = {"n_train_images": len(train_pairs), "n_val_images": len(val_pairs),
              "images_per_convention": {c: sum(p.convention == c for p in [*train_pairs, *val_pairs])
                                        for c in config.conventions}}
    attach_quality(path, combined_config(models, report, kept), next(iter(models.values())).tensors())
    return models


def _stored_image_gate(path: Path, config) -> tuple[ImageDensity | None, ViewGate | None] | None:
    """The image gate stored with the weights (a density or a view gate), or None where they carry none."""
    stored = (config.quality or {}).get("conventions", {})
    if not stored or not {"image", "view"} & set(config.quality):
        return None
    loaded = load_bundle(path)
    model = QualityModel.from_config(config.quality, loaded.quality_tensors, next(iter(stored)))
    return model.image, model.view


def _fit_view_gate(segmenter, train_pairs: Sequence[Pair], train: list[Observation], val: list[Observation],
                   negatives: Sequence[Negative], log: Callable[[str], None]) -> ViewGate:
    """The view gate on every calibration image (training images with augmented copies; validation images place
    its scale) against the negatives."""
    log(f"fitting the view gate: {len(train_pairs)} frontal training images against {len(negatives)} other images "
        "(each also seen through acquisition augmentations)")
    copies, other, kinds = view_features(segmenter, [p.image for p in train_pairs], negatives, log,
                                         lambda p: _read(p, read_model_view))
    frontal = np.concatenate([np.array([o.pooled for o in train]), copies])
    gate = fit_view_gate(frontal, np.array([o.pooled for o in val]), other, kinds)
    counts = {k: kinds.count(k) // (1 + NEGATIVE_COPIES) for k in gate.classes[1:]}
    log("view gate classes: " + ", ".join(f"{k} {n}" for k, n in counts.items()))
    return gate


def _kept_parts(config, fitted: list[str], log: Callable[[str], None]) -> dict[str, dict]:
    """The stored statistics of the conventions the data has no masks in: kept as they are (they do not depend
    on the image density, which is refitted), or none, which leaves that output uncalibrated."""
    kept = {}
    stored = (config.quality or {}).get("conventions", {})
    for convention in [c for c in config.conventions if c not in fitted]:
        if convention in stored:
            kept[convention] = {k: v for k, v in stored[convention].items() if k in PER_CONVENTION}
            log(f"no validation masks in the {convention} convention: its shape statistics and est_dice are kept")
        else:
            log(f"no validation masks in the {convention} convention: its output stays uncalibrated "
                "(null ood_score and est_dice)")
    return kept


# The fewest images a calibration is refused below. The validation images set the gate's threshold (a high
# quantile of their scores) and fit est_dice against their measured Dice, checked by cross-validation: with 2 of
# them (8 pairs at --val-fraction 0.25) the Spearman is undefined and the threshold is one image's score, and the
# gate then flagged 5 of 24 good CXRs. 10 is where a quantile and a rank correlation start to mean something; the
# training images fit the image density and the mask-shape statistics.
MIN_VAL_IMAGES = 10
MIN_TRAIN_IMAGES = 10
MODEL_MARKER = ".lungkit-model"


def calibrate_model(data: str | Path | list, weights: str | Path | None, out: str | Path | None, val_fraction: float,
                    seed: int, device: str = "auto", progress: bool = True, log: Callable[[str], None] = logger.info,
                    conventions: list[str] | None = None, refit_gate: bool = False,
                    negatives: Sequence[str | Path] = ()) -> dict:
    """`lungkit calibrate`: split DATA as `lungkit train` does (each data argument alone, in its convention),
    fit, store in the user's weights or in a copy in OUT (built aside: a failed calibration leaves nothing
    there). The bundled model is never changed. `negatives`: folders of images that are not frontal CXRs (a view
    gate is fitted; the installed packages' sample pictures join them). Returns each convention's report."""
    source = resolve_weights(weights) if weights is not None else DEFAULT_WEIGHTS
    if out is None and inside(source, DEFAULT_WEIGHTS.parent.parent):
        raise LungkitError("the bundled model is part of the installed package and is never changed: give -o FOLDER "
                           "for a calibrated copy")
    # bad data or an unusable split fails before anything is written
    others = _negatives(negatives)
    sources = data_sources(data, conventions or [defaults.CONVENTION])
    train_pairs, val_pairs, by_patient = split_sources(sources, val_fraction, seed)
    _check_enough(train_pairs, val_pairs, val_fraction)
    if not by_patient:
        log("warning: no patient_id in the data; validation is split by image and est_dice's error may be optimistic")
    torch_device = prepare_device(device)  # an unusable device fails before anything is written
    if out is None:
        models = calibrate(source, train_pairs, val_pairs, torch_device, progress=progress, log=log, refit_gate=refit_gate,
                           negatives=others)
        return _reports(models, source)
    out = Path(out)
    with staged_folder(out, source.parent, MODEL_MARKER, "lungkit calibrate") as staging:
        target = staging / "model.safetensors"
        shutil.copyfile(source, target)
        shutil.copyfile(_config_path(source), staging / "config.json")
        models = calibrate(target, train_pairs, val_pairs, torch_device, progress=progress, log=log, refit_gate=refit_gate,
                           negatives=others)
        (staging / MODEL_MARKER).write_text("a model calibrated by `lungkit calibrate`; a re-run replaces this folder\n")
    return _reports(models, out / "model.safetensors")


def _negatives(folders: Sequence[str | Path]) -> list[Negative]:
    """The images of the --negatives folders, and with them the installed packages' sample pictures (none without
    a folder: a view gate needs the user's lateral or cross-sectional images to be worth more than a density)."""
    found: list[Negative] = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            raise LungkitError(f"--negatives {folder}: not a folder")
        own = negatives_in(folder)
        if not own:
            raise LungkitError(f"--negatives {folder}: no images in it")
        found += own
    return found + package_negatives() if found else []


def _check_enough(train_pairs, val_pairs, val_fraction: float) -> None:
    """Refuse a calibration set too small to fit what calibration fits (see MIN_VAL_IMAGES)."""
    per_convention: dict[str, int] = {}
    for p in val_pairs:
        per_convention[p.convention] = per_convention.get(p.convention, 0) + 1
    short = {c: n for c, n in per_convention.items() if n < MIN_VAL_IMAGES}
    if not val_pairs or short or len(train_pairs) < MIN_TRAIN_IMAGES:
        got = ", ".join(f"{n} {c}" for c, n in per_convention.items()) or "none"
        raise LungkitError(
            f"too few images to calibrate: {len(train_pairs)} training and {got} validation at --val-fraction "
            f"{val_fraction:g}; calibration needs at least {MIN_TRAIN_IMAGES} training and {MIN_VAL_IMAGES} validation "
            "images per convention (the gate's threshold and est_dice are fitted on the validation images; fewer make "
            "them one image's accident)")


def _reports(models: dict, weights: Path) -> dict:
    return {c: {**m.report, "min_est_dice": m.min_est_dice, "weights": str(weights)} for c, m in models.items()}

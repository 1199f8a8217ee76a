"""Trust in each mask: an input gate (`ood_score`) and a quality estimate (`est_dice`), from one forward pass.

Shape contract: probabilities are (S, S) float in [0, 1] at model resolution; masks are (S, S) bool, the
cleaned mask at model resolution; `pooled` is the 1-D encoder summary `runtimes.torch.pooled_features` returns.
Functions are pure; inputs are never mutated.

- Image part of the gate, one of two kinds (the model's config says which; a manifest's metadata too):
  - `view` (`ViewGate`, what `calibrate --negatives` fits): "is this a frontal chest radiograph?", a multinomial
    logistic head on the pooled encoder features, frontal against the kinds of image that are not (lateral
    radiographs, CT/MR slices, anything else), fitted on every frontal collection and every non-frontal image
    given, with acquisition augmentations. Measured leave-one-collection-out, it holds on frontal collections it
    never saw, where a density of the same features flagged the unfamiliar collection (benchmarks/bench_view_gate.py).
  - `density` (`ImageDensity`, without negatives): a probabilistic-PCA density of the features on the training
    images (Ledoit-Wolf-shrunk Mahalanobis distance inside the subspace plus the residual off it): what a
    frontal CXR of the training collections is.
- Shape part of the gate: two lungs side by side, their extent and solidity, as a Ledoit-Wolf Mahalanobis
  distance from the masks of the training images. Applies to masks from anywhere (`lungkit variants`).
- Both parts are divided by their calibrated threshold, so `ood_score = max(image, shape)` and 1.0 is the
  gate's edge for either.
- `est_dice`: a ridge regression on the logit scale from boundary uncertainty and shape, fitted on
  validation patients (a second one adds flip agreement for `--tta`).

The fitted statistics live in the model's JSON config (`quality`) and, for the PCA arrays, as `quality.*`
tensors in its safetensors file; `lungmask_kit.training.calibrate` fits them. A model with an output per
annotation convention has one image density (the encoder is shared) and, per convention, its own shape
statistics and est_dice (`lungkit-quality/2`: `conventions` maps each to those parts).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from lungmask_kit.postprocess import PostprocessSettings, clean_mask

QUALITY_FORMAT = "lungkit-quality/1"  # one convention's statistics, flat
COMBINED_FORMAT = "lungkit-quality/2"  # the image gate once, the rest under `conventions`
PER_CONVENTION = ("shape", "est_dice", "est_dice_tta", "min_est_dice", "report")
TENSOR_PREFIX = "quality."
SHAPE_FEATURES = ("area", "left_share", "largest_share", "cx", "cy", "height", "width", "solidity",
                  "separation", "y_overlap")
UNCERTAINTY_FEATURES = ("mean_p_in", "log_threshold_change", "edge_uncertainty")
# chosen by leave-one-patient-out Spearman on the validation patients (0.795, against 0.749 for whole-image summaries)
EST_DICE_FEATURES = UNCERTAINTY_FEATURES
EST_DICE_TTA_FEATURES = UNCERTAINTY_FEATURES + ("flip_dice",)


def shape_descriptors(mask: np.ndarray) -> dict[str, float]:
    """(S, S) bool -> what a pair of frontal lungs looks like: area, left/right balance, the two largest
    regions' separation and vertical overlap, extent, solidity (area over convex-hull area)."""
    s = mask.shape[0]
    if not mask.any():
        return dict(zip(SHAPE_FEATURES, (0.0, 0.5, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0)))
    n, labels, stats, centroids = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    areas = stats[1:, cv2.CC_STAT_AREA]
    order = np.argsort(-areas) + 1
    ys, xs = np.nonzero(mask)
    hull_area = 0.0
    for i in order:
        contours, _ = cv2.findContours((labels == i).astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        hull_area += cv2.contourArea(cv2.convexHull(np.vstack(contours)))
    separation = y_overlap = 0.0
    if len(order) >= 2:
        a, b = order[:2]
        separation = abs(centroids[a][0] - centroids[b][0]) / s
        top = (stats[a, cv2.CC_STAT_TOP], stats[b, cv2.CC_STAT_TOP])
        bottom = (top[0] + stats[a, cv2.CC_STAT_HEIGHT], top[1] + stats[b, cv2.CC_STAT_HEIGHT])
        y_overlap = max(0, min(bottom) - max(top)) / (max(bottom) - min(top))
    return {
        "area": float(mask.mean()),
        "left_share": float((xs < s / 2).mean()),
        "largest_share": float(areas.max() / areas.sum()),
        "cx": float(xs.mean() / s),
        "cy": float(ys.mean() / s),
        "height": float((ys.max() - ys.min() + 1) / s),
        "width": float((xs.max() - xs.min() + 1) / s),
        "solidity": float(min(mask.sum() / max(hull_area, 1.0), 1.0)),
        "separation": float(separation),
        "y_overlap": float(y_overlap),
    }


def uncertainty_descriptors(probability: np.ndarray, mask: np.ndarray,
                            post: PostprocessSettings | None = None) -> dict[str, float]:
    """How sure the model was about this mask: the mean probability inside it; how much the cleaned mask
    changes between thresholds 0.3 and 0.7 (log of the changed area per lung pixel); and the mean Bernoulli
    variance 4p(1-p) in a 7-pixel band along its boundary. `post`: the run's post-processing."""
    post = post or PostprocessSettings()
    p = probability.astype(np.float32, copy=False)
    area = max(int(mask.sum()), 1)
    loose = clean_mask(p, replace(post, threshold=0.3))
    strict = clean_mask(p, replace(post, threshold=0.7))
    m = mask.astype(np.uint8)
    band = (cv2.dilate(m, _BAND_KERNEL) ^ cv2.erode(m, _BAND_KERNEL)).astype(bool)
    return {
        "mean_p_in": float(p[mask].mean()) if mask.any() else 0.0,
        "log_threshold_change": float(np.log(np.count_nonzero(loose ^ strict) / area + 1e-4)),
        "edge_uncertainty": float((4.0 * p[band] * (1.0 - p[band])).mean()) if band.any() else 0.0,
    }


_BAND_KERNEL = np.ones((7, 7), np.uint8)


def flip_agreement(mask: np.ndarray, mask_of_flipped: np.ndarray) -> float:
    """Dice between the mask and the mask predicted on the mirrored image (mirrored back)."""
    total = int(mask.sum()) + int(mask_of_flipped.sum())
    return 1.0 if total == 0 else 2.0 * float(np.logical_and(mask, mask_of_flipped).sum()) / total


@dataclass(frozen=True)
class Assessment:
    """The quality fields of one manifest row (None where the model part is unavailable)."""

    ood_score: float | None = None
    ood_image_score: float | None = None
    ood_shape_score: float | None = None
    est_dice: float | None = None
    view_guess: str | None = None  # what the view gate takes the image for (VIEW_CLASSES); None: no view gate

    def as_row(self) -> dict:
        r = lambda v: None if v is None else round(float(v), 4)  # noqa: E731
        return {"ood_score": r(self.ood_score), "ood_image_score": r(self.ood_image_score),
                "ood_shape_score": r(self.ood_shape_score), "est_dice": r(self.est_dice), "view_guess": self.view_guess}


@dataclass
class ImageDensity:
    """Probabilistic-PCA density of pooled encoder features; `score` is ~1 on training images."""

    mean: np.ndarray  # (D,)
    components: np.ndarray  # (K, D)
    z_mean: np.ndarray  # (K,)
    z_precision: np.ndarray  # (K, K), Ledoit-Wolf shrunk
    residual_scale: float  # mean squared residual off the subspace on training images
    threshold: float  # raw score at the gate's edge

    def raw_score(self, pooled: np.ndarray) -> np.ndarray:
        """(D,) or (N, D) -> (N,): mean of the in-subspace Mahalanobis term (per dimension) and the residual term."""
        f = np.atleast_2d(np.asarray(pooled, np.float64)) - self.mean
        z = f @ self.components.T
        d = z - self.z_mean
        maha = np.einsum("nk,kl,nl->n", d, self.z_precision, d) / len(self.z_mean)
        residual = ((f - z @ self.components) ** 2).sum(1) / self.residual_scale
        return 0.5 * (maha + residual)

    def tensors(self) -> dict[str, np.ndarray]:
        names = ("mean", "components", "z_mean", "z_precision")
        return {f"{TENSOR_PREFIX}image.{n}": np.ascontiguousarray(getattr(self, n), np.float32) for n in names}


VIEW_FORMAT = "lungkit-view/1"
FRONTAL = "frontal"
# the kinds a view gate tells apart; the first is what the model segments, the others are what a QC reason names
VIEW_CLASSES = (FRONTAL, "lateral", "cross-sectional", "other")
VIEW_WORDS = {"lateral": "a lateral radiograph", "cross-sectional": "a CT or MR slice", "other": "no chest radiograph"}


@dataclass
class ViewGate:
    """Frontal chest radiograph or not, from pooled encoder features: softmax(coef . (x - mean) / scale + intercept)
    over `classes` (frontal first). The score is the log-odds of "not frontal", placed so that `center` (the median
    of validation frontal images) is 0 and `edge` (the balanced decision boundary) is 1, clipped at 0."""

    classes: tuple[str, ...]
    mean: np.ndarray  # (D,)
    scale: np.ndarray  # (D,)
    coef: np.ndarray  # (K, D)
    intercept: np.ndarray  # (K,)
    center: float
    edge: float

    def log_probabilities(self, pooled: np.ndarray) -> np.ndarray:
        """(D,) or (N, D) -> (N, K) log class probabilities."""
        x = (np.atleast_2d(np.asarray(pooled, np.float64)) - self.mean) / self.scale
        z = x @ self.coef.T + self.intercept
        return z - np.logaddexp.reduce(z, axis=1, keepdims=True)

    def scores(self, pooled: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """(N, D) -> (N,) gate scores (1 = the edge) and what each image looks like: frontal up to the edge, past it
        the most likely other kind."""
        lp = self.log_probabilities(pooled)
        not_frontal = np.logaddexp.reduce(lp[:, 1:], axis=1) - lp[:, 0]
        score = np.maximum((not_frontal - self.center) / (self.edge - self.center), 0.0)
        # past the edge, the most likely of the other kinds (a curator's first question: a lateral or a false alarm?)
        other = lp[:, 1:].argmax(1) + 1
        return score, [self.classes[k] if s > 1.0 else FRONTAL for k, s in zip(other, score)]

    def tensors(self) -> dict[str, np.ndarray]:
        names = ("mean", "scale", "coef", "intercept")
        return {f"{TENSOR_PREFIX}view.{n}": np.ascontiguousarray(getattr(self, n), np.float32) for n in names}

    def to_config(self) -> dict:
        return {"format": VIEW_FORMAT, "classes": list(self.classes), "center": round(float(self.center), 6),
                "edge": round(float(self.edge), 6), "features": "sqrt of 2x2 average-pooled deepest encoder features"}

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, np.ndarray]) -> "ViewGate":
        if cfg.get("format") != VIEW_FORMAT:
            raise ValueError(f"view gate format {cfg.get('format')!r}, this lungkit reads {VIEW_FORMAT}")
        t = {n: np.asarray(tensors[f"{TENSOR_PREFIX}view.{n}"], np.float64) for n in ("mean", "scale", "coef", "intercept")}
        if t["coef"].shape[0] != len(cfg["classes"]) or cfg["classes"][0] != FRONTAL:
            raise ValueError("view gate classes do not match its coefficients")
        return cls(tuple(cfg["classes"]), t["mean"], t["scale"], t["coef"], t["intercept"], float(cfg["center"]),
                   float(cfg["edge"]))


@dataclass
class ShapeModel:
    mean: np.ndarray
    std: np.ndarray
    precision: np.ndarray
    threshold: float

    def raw_score(self, descriptors: dict[str, float]) -> float:
        x = (np.array([descriptors[n] for n in SHAPE_FEATURES]) - self.mean) / self.std
        return float(x @ self.precision @ x) / len(SHAPE_FEATURES)

    def score(self, mask: np.ndarray) -> float:
        """(S, S) bool mask at model resolution -> shape part of the gate (1.0 = the gate's edge)."""
        return self.raw_score(shape_descriptors(mask)) / self.threshold

    @classmethod
    def from_dict(cls, s: dict) -> "ShapeModel":
        if tuple(s["features"]) != SHAPE_FEATURES:
            raise ValueError(f"shape features {s['features']} differ from this lungkit's {list(SHAPE_FEATURES)}")
        return cls(np.array(s["mean"]), np.array(s["std"]), np.array(s["precision"]), float(s["threshold"]))


@dataclass
class DiceRegressor:
    """est_dice = sigmoid(intercept + coef . (x - mean) / std): bounded in (0, 1)."""

    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    coef: np.ndarray
    intercept: float

    def predict(self, values: dict[str, float]) -> float:
        x = (np.array([values[n] for n in self.features]) - self.mean) / self.std
        return float(1.0 / (1.0 + np.exp(-(self.intercept + float(x @ self.coef)))))

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": _r(self.mean), "std": _r(self.std), "coef": _r(self.coef),
                "intercept": round(float(self.intercept), 8)}

    @classmethod
    def from_dict(cls, d: dict) -> "DiceRegressor":
        return cls(tuple(d["features"]), np.array(d["mean"]), np.array(d["std"]), np.array(d["coef"]), float(d["intercept"]))


def _r(a) -> list:
    return [round(float(v), 8) for v in np.ravel(a)] if np.ndim(a) == 1 else [_r(row) for row in a]


@dataclass
class QualityModel:
    """Everything fitted for the gate and est_dice; stored with the model (config JSON + safetensors)."""

    shape: ShapeModel
    est_dice: DiceRegressor
    image: ImageDensity | None = None
    est_dice_tta: DiceRegressor | None = None
    max_ood_score: float = 1.0
    min_est_dice: float = 0.0
    report: dict = field(default_factory=dict)
    view: ViewGate | None = None  # where set, the image part of the gate (and `image` is None)

    @property
    def gate(self) -> str:
        """Which image gate scores `ood_image_score`: "view", "density" or "none" (the shape part alone)."""
        return "view" if self.view is not None else "density" if self.image is not None else "none"

    def assess(self, probability: np.ndarray, mask: np.ndarray, pooled: np.ndarray | None = None,
               mask_of_flipped: np.ndarray | None = None, post: PostprocessSettings | None = None) -> Assessment:
        """One image's gate scores and est_dice from what inference already has."""
        values = {**shape_descriptors(mask), **uncertainty_descriptors(probability, mask, post)}
        if mask_of_flipped is not None:
            values["flip_dice"] = flip_agreement(mask, mask_of_flipped)
        return self.assess_values(values, pooled)

    def assess_values(self, values: dict[str, float], pooled: np.ndarray | None = None) -> Assessment:
        """The same from descriptors already computed (`flip_dice` present: the --tta regressor)."""
        shape_score = self.shape.raw_score(values) / self.shape.threshold
        image_score = guess = None
        if pooled is not None and self.view is not None:
            scores, guesses = self.view.scores(pooled)
            image_score, guess = float(scores[0]), guesses[0]
        elif pooled is not None and self.image is not None:
            image_score = float(self.image.raw_score(pooled)[0]) / self.image.threshold
        tta = "flip_dice" in values and self.est_dice_tta is not None
        est = (self.est_dice_tta if tta else self.est_dice).predict(values)
        ood = shape_score if image_score is None else max(shape_score, image_score)
        return Assessment(ood, image_score, shape_score, est, guess)

    def to_config(self) -> dict:
        cfg = {
            "format": QUALITY_FORMAT,
            "max_ood_score": self.max_ood_score,
            "min_est_dice": self.min_est_dice,
            "shape": {"features": list(SHAPE_FEATURES), "mean": _r(self.shape.mean), "std": _r(self.shape.std),
                      "precision": _r(self.shape.precision), "threshold": round(self.shape.threshold, 6)},
            "est_dice": self.est_dice.to_dict(),
            "report": self.report,
        }
        if self.est_dice_tta is not None:
            cfg["est_dice_tta"] = self.est_dice_tta.to_dict()
        if self.view is not None:
            cfg["view"] = self.view.to_config()
        elif self.image is not None:
            cfg["image"] = {"features": "sqrt of 2x2 average-pooled deepest encoder features",
                            "n_components": int(len(self.image.z_mean)),
                            "residual_scale": float(self.image.residual_scale), "threshold": round(self.image.threshold, 6)}
        return cfg

    def tensors(self) -> dict[str, np.ndarray]:
        gate = self.view if self.view is not None else self.image
        return gate.tensors() if gate is not None else {}

    @classmethod
    def from_config(cls, cfg: dict, tensors: dict[str, np.ndarray], convention: str | None = None) -> "QualityModel":
        """The quality model of one convention (`convention_config`) from a model's config and tensors."""
        cfg = convention_config(cfg, convention)
        shape = ShapeModel.from_dict(cfg["shape"])
        image = None
        if "image" in cfg:
            t = {n: np.asarray(tensors[f"{TENSOR_PREFIX}image.{n}"], np.float64)
                 for n in ("mean", "components", "z_mean", "z_precision")}
            image = ImageDensity(t["mean"], t["components"], t["z_mean"], t["z_precision"],
                                 float(cfg["image"]["residual_scale"]), float(cfg["image"]["threshold"]))
        view = ViewGate.from_config(cfg["view"], tensors) if "view" in cfg else None
        tta = DiceRegressor.from_dict(cfg["est_dice_tta"]) if "est_dice_tta" in cfg else None
        return cls(shape, DiceRegressor.from_dict(cfg["est_dice"]), image, tta, float(cfg["max_ood_score"]),
                   float(cfg["min_est_dice"]), cfg.get("report", {}), view)


def calibrated_for(cfg: dict, convention: str) -> bool:
    """Whether a model's quality config holds statistics for `convention` (a flat one serves every convention)."""
    return "conventions" not in cfg or convention in cfg["conventions"]


def convention_config(cfg: dict, convention: str | None) -> dict:
    """A model's quality config -> the flat config of one convention (the shared image gate plus that
    convention's shape statistics and est_dice). A flat `lungkit-quality/1` config serves every convention."""
    if "conventions" not in cfg:
        return cfg
    if convention not in cfg["conventions"]:
        raise ValueError(f"no quality statistics for the {convention!r} convention "
                         f"(calibrated: {', '.join(cfg['conventions'])})")
    own = cfg["conventions"][convention]
    shared = {k: v for k, v in cfg.items() if k != "conventions"}
    return {**shared, **own, "report": {**shared.get("report", {}), **own.get("report", {})}}


def combined_config(models: dict[str, QualityModel], report: dict, kept: dict[str, dict] | None = None) -> dict:
    """One quality config for a model with an output per convention: the image gate once (every convention's
    model shares it), the rest per convention; `report` says how the shared gate was fitted and measured;
    `kept`: per-convention parts carried over unchanged from an earlier calibration."""
    first = next(iter(models.values())).to_config()
    shared = {k: v for k, v in first.items() if k not in PER_CONVENTION}
    conventions = {**(kept or {}),
                   **{c: {k: v for k, v in m.to_config().items() if k in PER_CONVENTION} for c, m in models.items()}}
    return {**shared, "format": COMBINED_FORMAT, "report": report, "conventions": conventions}

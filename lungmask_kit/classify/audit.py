"""Uncertainty of the audit's numbers: a patient-level bootstrap of the test predictions, pooled over seeds.

Method (README, "lungkit classify"): each replicate draws the test patients with replacement (a patient's
images stay together), scores every seed's model on the drawn images, and averages over seeds. A metric's
point value is the mean over seeds on the whole test split; its `_ci95` is the 2.5th and 97.5th percentile of
the replicates. A comparison of two variants uses the same draws for both (paired): the AUC difference's
interval, and a two-sided p-value = 2 x the smaller share of replicates on either side of zero (at least
1 / replicates). Replicates where a metric is undefined (one class drawn) are left out of that metric.
"""

from __future__ import annotations

import numpy as np

from lungmask_kit.metrics import binary_classification_metrics, roc_auc

METRICS = ("accuracy", "sensitivity", "specificity", "precision", "recall", "f1", "roc_auc")
PAIRS = (("lungs", "nolungs"), ("original", "lungs"), ("original", "nolungs"))


def patient_draws(patients: list[str], replicates: int, seed: int) -> list[np.ndarray]:
    """`replicates` bootstrap samples of row numbers, drawing whole patients with replacement."""
    patients = np.asarray(patients)
    ids = sorted(set(patients.tolist()))
    rows = [np.flatnonzero(patients == p) for p in ids]
    rng = np.random.default_rng(seed)
    return [np.concatenate([rows[k] for k in rng.integers(0, len(ids), len(ids))]) for _ in range(replicates)]


def seed_mean(labels: np.ndarray, probs: list[np.ndarray], rows: np.ndarray | None, threshold: float) -> dict:
    """Each metric averaged over the seeds' predictions on `rows` (all rows when None); None where undefined."""
    values: dict[str, list] = {m: [] for m in METRICS}
    for p in probs:
        y, s = (labels, p) if rows is None else (labels[rows], p[rows])
        m = binary_classification_metrics(y, s, threshold)
        for name in METRICS:
            values[name].append(m[name])
    return {name: (None if any(v is None for v in vs) else float(np.mean(vs))) for name, vs in values.items()}


def interval(values: list[float | None]) -> list[float] | None:
    known = np.asarray([v for v in values if v is not None and np.isfinite(v)], np.float64)
    if known.size == 0:
        return None
    return [float(np.percentile(known, 2.5)), float(np.percentile(known, 97.5))]


def summarize(labels, patients, probs_by_variant: dict[str, list[np.ndarray]], threshold: float, replicates: int,
              seed: int) -> tuple[dict, list[dict]]:
    """({variant: metrics with `_ci95` and `per_seed`}, [comparisons]) on one test split."""
    labels = np.asarray(labels, int)
    draws = patient_draws(patients, replicates, seed)
    boot = {v: [seed_mean(labels, probs, rows, threshold) for rows in draws] for v, probs in probs_by_variant.items()}
    metrics = {}
    for variant, probs in probs_by_variant.items():
        point = seed_mean(labels, probs, None, threshold)
        per_seed = [binary_classification_metrics(labels, p, threshold) for p in probs]
        metrics[variant] = {**point, **{f"{m}_ci95": interval([b[m] for b in boot[variant]]) for m in METRICS},
                            "n": int(len(labels)), "n_patients": int(len(set(patients))), "seeds": len(probs),
                            "threshold": threshold, "per_seed": per_seed}
    comparisons = [compare(a, b, metrics, boot) for a, b in PAIRS if a in metrics and b in metrics]
    return metrics, comparisons


def compare(a: str, b: str, metrics: dict, boot: dict, metric: str = "roc_auc") -> dict:
    """Paired bootstrap of `metric`(a) - `metric`(b)."""
    point = None if metrics[a][metric] is None or metrics[b][metric] is None else metrics[a][metric] - metrics[b][metric]
    diffs = np.asarray([x[metric] - y[metric] for x, y in zip(boot[a], boot[b])
                        if x[metric] is not None and y[metric] is not None], np.float64)
    p = None
    if diffs.size:
        p = float(min(1.0, max(2 * min((diffs <= 0).mean(), (diffs >= 0).mean()), 1.0 / diffs.size)))
    return {"a": a, "b": b, "metric": metric, "difference": point, "difference_ci95": interval(diffs.tolist()),
            "p_value": p, "replicates": int(diffs.size), "sentence": comparison_sentence(a, b, point, interval(diffs.tolist()), p)}


def comparison_sentence(a: str, b: str, diff: float | None, ci: list[float] | None, p: float | None) -> str:
    """What the numbers support, in one sentence."""
    if diff is None or ci is None:
        return f"{a} vs {b}: the AUC is undefined (one class in the test split), so nothing can be said."
    stats = f"(AUC difference {diff:+.3f}, 95% CI {ci[0]:+.3f} to {ci[1]:+.3f}, p = {p:.3f})"
    if ci[0] > 0 or ci[1] < 0:
        better, worse = (a, b) if diff > 0 else (b, a)
        return f"{better} scores a higher AUC than {worse} {stats}: the difference is larger than the test split's noise."
    verdict = (" A classifier that does as well without the lungs is using cues outside them." if {a, b} == {"lungs", "nolungs"} else "")
    return f"{a} and {b} cannot be told apart on this test split {stats}.{verdict}"


def multiclass_auc(targets: np.ndarray, probs: np.ndarray) -> float | None:
    """ROC AUC of predicting a source: binary for two classes, macro one-vs-rest for more; None when the test
    split holds one class."""
    from sklearn.metrics import roc_auc_score

    targets = np.asarray(targets)
    present = np.unique(targets)
    if present.size < 2:
        return None
    if probs.ndim == 1 or probs.shape[1] == 1:
        return roc_auc(targets, probs.reshape(-1))
    if probs.shape[1] == 2:
        return roc_auc(targets, probs[:, 1])
    scores = probs[:, present] / probs[:, present].sum(1, keepdims=True)
    labels = np.searchsorted(present, targets)
    if present.size == 2:
        return roc_auc(labels, scores[:, 1])
    return float(roc_auc_score(labels, scores, multi_class="ovr", average="macro"))


def mean_ci(values_by_patient: dict[str, list[float]], replicates: int, seed: int) -> tuple[float | None, list[float] | None]:
    """Mean of per-image values (e.g. saliency_in_lungs) and its patient-bootstrap interval."""
    flat = [v for vs in values_by_patient.values() for v in vs if np.isfinite(v)]
    if not flat:
        return None, None
    ids = sorted(values_by_patient)
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(replicates):
        drawn = [v for k in rng.integers(0, len(ids), len(ids)) for v in values_by_patient[ids[k]] if np.isfinite(v)]
        if drawn:
            reps.append(float(np.mean(drawn)))
    return float(np.mean(flat)), interval(reps)

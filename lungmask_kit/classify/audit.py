"""Uncertainty of the audit's numbers: a patient-level bootstrap of the test predictions, pooled over seeds.

Method (README, "lungkit classify"): each replicate draws the test patients with replacement (a patient's
images stay together), scores every seed's model on the drawn images, and averages over seeds. A metric's
point value is the mean over seeds on the whole test split; its `_ci95` is the 2.5th and 97.5th percentile of
the replicates. A comparison of two variants uses the same draws for both (paired): the AUC difference's
interval, and a two-sided p-value = 2 x the smaller share of replicates on either side of zero (at least
1 / replicates). Replicates where a metric is undefined (one class drawn) are left out of that metric.

Below MIN_TEST_PATIENTS_PER_CLASS test patients in either class, no interval and no p-value is reported (null,
with a `note`): a patient bootstrap can only redraw the patients it has, so with a handful of them its
percentiles describe those few people, not the population, and a p-value from it is an artefact (one negative
test patient gave p = 0.002 for every comparison). The point values stay, flagged by the note.
"""

from __future__ import annotations

import numpy as np

from lungmask_kit.metrics import binary_classification_metrics, roc_auc

METRICS = ("accuracy", "sensitivity", "specificity", "precision", "recall", "f1", "roc_auc")
PAIRS = (("lungs", "nolungs"), ("original", "lungs"), ("original", "nolungs"))
MIN_TEST_PATIENTS_PER_CLASS = 10
USES_OUTSIDE_AUC = 0.7  # a lungs-removed classifier below this AUC is not "doing as well" at anything


def too_few_patients(labels, patients, what: str = "test patients", minimum: int = MIN_TEST_PATIENTS_PER_CLASS) -> str | None:
    """The note saying why intervals and p-values are withheld, or None when each class has enough patients."""
    per_class = {c: len({p for p, y in zip(patients, labels) if int(y) == c}) for c in (1, 0)}
    if min(per_class.values()) >= minimum:
        return None
    return (f"too few {what} for an interval or a p-value ({per_class[1]} positive, {per_class[0]} negative; "
            f"at least {minimum} of each are needed)")


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
              seed: int, min_patients: int = MIN_TEST_PATIENTS_PER_CLASS) -> tuple[dict, list[dict]]:
    """({variant: metrics with `_ci95` and `per_seed`}, [comparisons]) on one test split; intervals and p-values
    only with at least `min_patients` test patients per class."""
    labels = np.asarray(labels, int)
    note = too_few_patients(labels, patients, minimum=min_patients)
    draws = [] if note else patient_draws(patients, replicates, seed)
    boot = {v: [seed_mean(labels, probs, rows, threshold) for rows in draws] for v, probs in probs_by_variant.items()}
    metrics = {}
    for variant, probs in probs_by_variant.items():
        point = seed_mean(labels, probs, None, threshold)
        per_seed = [binary_classification_metrics(labels, p, threshold) for p in probs]
        metrics[variant] = {**point, **{f"{m}_ci95": interval([b[m] for b in boot[variant]]) for m in METRICS},
                            "n": int(len(labels)), "n_patients": int(len(set(patients))), "seeds": len(probs),
                            "threshold": threshold, "per_seed": per_seed, "note": note}
    comparisons = [compare(a, b, metrics, boot, note=note) for a, b in PAIRS if a in metrics and b in metrics]
    return metrics, comparisons


def compare(a: str, b: str, metrics: dict, boot: dict, metric: str = "roc_auc", note: str | None = None) -> dict:
    """Paired bootstrap of `metric`(a) - `metric`(b); no interval or p-value with a `note` (too few patients)."""
    point = None if metrics[a][metric] is None or metrics[b][metric] is None else metrics[a][metric] - metrics[b][metric]
    diffs = np.asarray([x[metric] - y[metric] for x, y in zip(boot[a], boot[b])
                        if x[metric] is not None and y[metric] is not None], np.float64)
    p = None
    if diffs.size:
        p = float(min(1.0, max(2 * min((diffs <= 0).mean(), (diffs >= 0).mean()), 1.0 / diffs.size)))
    ci = interval(diffs.tolist())
    return {"a": a, "b": b, "metric": metric, "difference": point, "difference_ci95": ci, "p_value": p,
            "replicates": int(diffs.size), "note": note,
            "sentence": comparison_sentence(a, b, point, ci, p, note, {v: m.get(metric) for v, m in metrics.items()})}


def comparison_sentence(a: str, b: str, diff: float | None, ci: list[float] | None, p: float | None,
                        note: str | None = None, aucs: dict | None = None) -> str:
    """What the numbers support, in one sentence, and nothing more."""
    if diff is None:
        return f"{a} vs {b}: the AUC is undefined (one class in the test split), so nothing can be said."
    if note or ci is None:
        return (f"{a} vs {b}: the AUC differs by {diff:+.3f} on this test split, but there are {note or 'too few test patients'}"
                ": no claim either way.")
    stats = f"(AUC difference {diff:+.3f}, 95% CI {ci[0]:+.3f} to {ci[1]:+.3f}, p = {p:.3f})"
    if ci[0] > 0 or ci[1] < 0:
        better, worse = (a, b) if diff > 0 else (b, a)
        return f"{better} scores a higher AUC than {worse} {stats}: the difference is larger than the test split's noise."
    nolungs = (aucs or {}).get("nolungs")
    verdict = (" A classifier that does as well without the lungs is using cues outside them."
               if {a, b} == {"lungs", "nolungs"} and nolungs is not None and nolungs >= USES_OUTSIDE_AUC else "")
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

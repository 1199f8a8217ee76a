"""Source leakage: can a classifier tell which collection an image came from (from the whole image, the lungs
only, the lungs removed), and how does the COVID-19 classifier fare on a collection it never saw? Needs a
`source` per image (a label file's source column); skipped with a reason otherwise."""

from __future__ import annotations

import numpy as np

from lungmask_kit.classify.audit import MIN_TEST_PATIENTS_PER_CLASS, interval, multiclass_auc, patient_draws, too_few_patients
from lungmask_kit.metrics import binary_classification_metrics


def _sources(samples) -> list[str]:
    return sorted({s.source for s in samples if s.source})


def source_prediction(run, samples, train, test) -> dict:
    """Per variant: the ROC AUC (macro one-vs-rest for more than two sources) of a classifier trained to predict
    the source on the training split and scored on the test split, with a patient-bootstrap interval."""
    sources = _sources(samples)
    if len(sources) < 2:
        return {"skipped": "the manifest names fewer than two sources (a source column, e.g. from --labels)"}
    index = {name: k for k, name in enumerate(sources)}
    train = [s for s in train if s.source]
    test = [s for s in test if s.source]
    targets = np.array([index[s.source] for s in test])
    result = {"sources": {name: sum(s.source == name for s in samples) for name in sources},
              "test_sources": {name: int((targets == index[name]).sum()) for name in sources}, "variants": {}}
    # enough test patients of every source, or no interval (the same rule as the COVID-19 metrics)
    per_source = {name: len({s.patient_id for s in test if s.source == name}) for name in sources}
    short = {k: n for k, n in per_source.items() if n < MIN_TEST_PATIENTS_PER_CLASS}
    note = (f"too few test patients of a source for an interval ({', '.join(f'{k}: {n}' for k, n in short.items())}; "
            f"at least {MIN_TEST_PATIENTS_PER_CLASS} each are needed)") if short else None
    result["note"] = note
    draws = [] if note else patient_draws([s.patient_id for s in test], run.settings.bootstrap, run.settings.seed)
    for variant in run.settings.variants:
        model, _, norm = run.train(variant, train, run.settings.seed, [index[s.source] for s in train], len(sources), "source")
        from lungmask_kit.classify.model import predict

        probs = predict(model, run.dataset(variant, test, targets, norm, augment=False, classes=len(sources)),
                        run.device, run.settings.batch_size, run.settings.precision)
        boot = [multiclass_auc(targets[rows], probs[rows]) for rows in draws]
        auc = multiclass_auc(targets, probs)  # a point value; `note` says when it rests on too few patients
        result["variants"][variant] = {"auc": auc, "auc_ci95": interval(boot), "n_test": len(test)}
        run.log(f"{variant}: source AUC {result['variants'][variant]['auc']}")
    return result


def leave_one_source_out(run, samples) -> dict:
    """For each source: train the COVID-19 classifier on every other source and test on this one (external
    validation). AUC is undefined where the held-out source has one class; sensitivity or specificity remain."""
    sources = _sources(samples)
    if len(sources) < 2:
        return {"skipped": "the manifest names fewer than two sources"}
    out = {}
    for held in sources:
        test = [s for s in samples if s.source == held]
        patients = {s.patient_id for s in test}
        train = [s for s in samples if s.source and s.source != held and s.patient_id not in patients]
        entry = {"n": len(test), "positives": sum(s.label for s in test), "n_train": len(train), "variants": {},
                 "note": too_few_patients([s.label for s in test], [s.patient_id for s in test], "patients in this source")}
        if len({s.label for s in train}) < 2:
            out[held] = {**entry, "skipped": "the other sources hold one class only"}
            continue
        for variant in run.settings.variants:
            from lungmask_kit.classify.model import predict

            model, _, norm = run.train(variant, train, run.settings.seed, None, 1, f"without-{held}")
            ds = run.dataset(variant, test, [s.label for s in test], norm, augment=False)
            m = binary_classification_metrics([s.label for s in test], predict(model, ds, run.device, run.settings.batch_size, run.settings.precision),
                                              run.settings.threshold)
            entry["variants"][variant] = {k: m[k] for k in ("accuracy", "sensitivity", "specificity", "roc_auc")}
        out[held] = entry
    return {"held_out": out}

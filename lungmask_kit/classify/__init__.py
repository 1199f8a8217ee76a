"""`lungkit classify`: a shortcut audit of COVID-19 classifiers on original / lungs-only / lungs-removed images.

A classifier that scores as well on lungs-removed images as on lungs-only ones is learning shortcuts (source,
markers, style) rather than lung findings; this package makes that audit one call, with several seeds,
patient-bootstrap intervals, paired comparisons, Grad-CAM inside the lungs, and source leakage.

- `data`: settings, samples, splits, the image cache; `model`: classifiers, training, Grad-CAM;
  `audit`: bootstrap intervals and comparisons; `leakage`: source prediction and leave-one-source-out;
  `run`: the entry point; `report`: metrics.json, predictions.parquet, results.md, figures.
"""

from lungmask_kit.choices import VariantChoice
from lungmask_kit.classify.data import VARIANT_COLUMNS, ClassifySettings, Sample, load_samples, split_samples
from lungmask_kit.classify.report import comparison_table
from lungmask_kit.classify.run import run_classify
from lungmask_kit.errors import LungkitError
from lungmask_kit.models.modeling import load_config


def variants_to_run(variant: str, checkpoint=None) -> tuple[str, ...]:
    """The variants a run covers: one, or all three; with a checkpoint and `all`, the one it was trained on."""
    variant = VariantChoice(variant).value
    if variant != "all":
        return (variant,)
    if checkpoint is not None:

        trained_on = load_config(checkpoint)[0].provenance.get("variant")
        if trained_on:
            return (trained_on,)
    return tuple(VARIANT_COLUMNS)


__all__ = ["VARIANT_COLUMNS", "ClassifySettings", "LungkitError", "Sample", "comparison_table", "load_samples",
           "run_classify", "split_samples", "variants_to_run"]

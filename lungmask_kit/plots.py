"""Figures as PNG bytes, drawn with matplotlib's object API on the Agg canvas: no pyplot state, no display,
safe to call from any thread. Used by `lungkit report` and `lungkit classify`."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

PASS_COLOUR, FLAG_COLOUR, LINE_COLOUR = "#4c78a8", "#e45756", "#222222"
VARIANT_COLOURS = {"original": "#4c78a8", "lungs": "#54a24b", "nolungs": "#e45756"}


def _figure(width: float = 6.0, height: float = 3.4):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return fig, fig.add_subplot()


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})  # no version stamp: same data, same bytes
    return buf.getvalue()


def histogram_png(passed: Sequence[float], flagged: Sequence[float], title: str, xlabel: str,
                  thresholds: Sequence[tuple[float, str]] = (), log_x: bool = False, bins: int = 40) -> bytes:
    """A stacked histogram of the values of images that passed QC and of flagged ones, with each threshold
    drawn as a dashed line labelled with its name and value."""
    fig, ax = _figure()
    values = np.asarray([*passed, *flagged], dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        ax.text(0.5, 0.5, "no values", ha="center", va="center", transform=ax.transAxes)
    else:
        lo, hi = float(values.min()), float(values.max())
        for value, _ in thresholds:
            lo, hi = min(lo, value), max(hi, value)
        if log_x:
            lo = max(lo, 1e-3)
            edges = np.geomspace(lo, max(hi, lo * 1.01), bins + 1)
            ax.set_xscale("log")
        else:
            edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, bins + 1)
        data = [np.asarray(passed, np.float64), np.asarray(flagged, np.float64)]
        ax.hist(data, bins=edges, stacked=True, color=[PASS_COLOUR, FLAG_COLOUR],
                label=[f"passed QC ({len(passed)})", f"flagged ({len(flagged)})"])
        for value, name in thresholds:
            ax.axvline(value, color=LINE_COLOUR, linestyle="--", linewidth=1.2, label=f"{name} = {value:g}")
        ax.legend(fontsize=8, loc="best", framealpha=0.9)
        from matplotlib.ticker import MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("images")
    return _png(fig)


def roc_png(curves: dict[str, tuple], bands: dict[str, tuple] | None = None) -> bytes:
    """ROC curves, one per variant: {variant: (fpr, tpr, auc[, (lo, hi)])}, the AUC (and its interval) in the
    legend; `bands`: {variant: (fpr grid, tpr low, tpr high)} drawn as a shaded 95% band."""
    fig, ax = _figure(5.0, 4.6)
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="chance")
    for variant, (grid, lo, hi) in (bands or {}).items():
        ax.fill_between(grid, lo, hi, color=VARIANT_COLOURS.get(variant), alpha=0.15, linewidth=0, step="post")
    for variant, (fpr, tpr, auc, *ci) in curves.items():
        label = f"{variant} (AUC {auc:.3f}" if auc is not None else f"{variant} (AUC n/a"
        label += f", 95% CI {ci[0][0]:.2f}-{ci[0][1]:.2f})" if ci and ci[0] else ")"
        ax.plot(fpr, tpr, linewidth=2, color=VARIANT_COLOURS.get(variant), label=label, drawstyle="steps-post")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.005)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC on the test split" + (" (seed-averaged prediction; AUC: mean over seeds)" if bands else ""),
                 fontsize=9 if bands else 10)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _png(fig)


def metrics_png(metrics: dict[str, dict], names: Sequence[str] = ("accuracy", "sensitivity", "specificity", "precision", "f1", "roc_auc")) -> bytes:
    """Grouped bars: each metric (x) for each variant (colour), value printed on the bar, and the metric's 95%
    interval (`<metric>_ci95`) as an error bar where the metrics carry one."""
    fig, ax = _figure(7.0, 3.6)
    variants = list(metrics)
    width = 0.8 / max(len(variants), 1)
    x = np.arange(len(names))
    for i, variant in enumerate(variants):
        values = [metrics[variant].get(n) for n in names]
        heights = [v if v is not None else 0.0 for v in values]
        cis = [metrics[variant].get(f"{n}_ci95") for n in names]
        errors = np.array([[h - c[0], c[1] - h] if c and v is not None else [0, 0] for h, v, c in zip(heights, values, cis)]).T
        bars = ax.bar(x + (i - (len(variants) - 1) / 2) * width, heights, width, label=variant,
                      color=VARIANT_COLOURS.get(variant), yerr=np.clip(errors, 0, None) if any(cis) else None,
                      capsize=2, error_kw={"linewidth": 0.8})
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        xytext=(0, 2), textcoords="offset points", ha="center", fontsize=7)
    ax.set_xticks(x, [{"roc_auc": "ROC AUC", "f1": "F1"}.get(n, n) for n in names])
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("on the test split")
    ax.set_title("Metrics per variant", fontsize=10)
    ax.legend(fontsize=8, ncols=len(variants), loc="upper center", bbox_to_anchor=(0.5, -0.12))
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def saliency_png(examples: dict[str, tuple]) -> bytes:
    """Grad-CAM maps over the images: a row per variant, a column per example image; each panel's title gives
    the share of the map inside the lungs (outlined)."""
    from matplotlib.figure import Figure

    variants = list(examples)
    cols = max(len(e[0]) for e in examples.values())
    fig = Figure(figsize=(2.1 * cols, 2.3 * len(variants)), dpi=100, layout="constrained")
    axes = fig.subplots(len(variants), cols, squeeze=False)
    for r, variant in enumerate(variants):
        images, cams, masks, names = examples[variant]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_axis_off()
            if c >= len(images):
                continue
            cam = cams[c] / cams[c].max() if cams[c].max() > 0 else cams[c]
            inside = float((cams[c] * masks[c]).sum() / cams[c].sum()) if cams[c].sum() > 0 else float("nan")
            ax.imshow(images[c], cmap="gray", vmin=0, vmax=1)
            ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
            ax.contour(masks[c], levels=[0.5], colors="white", linewidths=0.6)
            ax.set_title(f"{variant}: {inside:.0%} in lungs" if np.isfinite(inside) else f"{variant}: no attribution", fontsize=8)
    return _png(fig)

"""What the report shows: every flagged image (one sheet per QC reason), the lowest-quality ok images, a random
sample of ok images, and every failure. Chosen from the manifest's columns alone, with numpy over whole columns
(only the flagged rows' reasons become Python strings)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lungmask_kit.manifest import RunManifest
from lungmask_kit.qc import short_reason, split_reasons
from lungmask_kit.report.options import ReportOptions

# ordering of "lowest quality", first column the run has: (column, +1 lowest first / -1 highest first)
QUALITY_COLUMNS = (("est_dice", 1), ("ood_score", -1), ("ood_shape_score", -1), ("lung_area_fraction", 1))


@dataclass
class Selection:
    sample: list[int] = field(default_factory=list)
    lowest: list[int] = field(default_factory=list)
    lowest_by: str = ""  # the column "lowest quality" is ordered by
    by_reason: dict[str, list[int]] = field(default_factory=dict)  # short QC reason -> flagged rows, worst first
    failed: list[int] = field(default_factory=list)

    def shown(self) -> list[int]:
        """Every row that gets an overlay, once."""
        rows = set(self.sample) | set(self.lowest)
        for members in self.by_reason.values():
            rows.update(members)
        return sorted(rows)


def quality_order(data: RunManifest, ok: np.ndarray) -> tuple[str, np.ndarray]:
    """Ok row numbers, worst first by the first quality column the run has; rows without the value last, ties
    in manifest order."""
    for column, direction in QUALITY_COLUMNS:
        values = data.numbers(column)[ok]
        known = ~np.isnan(values)
        if known.any():
            order = np.lexsort((ok[known], direction * values[known]))
            return column, np.concatenate([ok[known][order], ok[~known]])
    return "", ok


def sample_rows(candidates: np.ndarray, k: int, seed: int) -> list[int]:
    """A reproducible random sample of row numbers, in manifest order."""
    if len(candidates) <= k:
        return candidates.tolist()
    return sorted(np.random.default_rng(seed).choice(candidates, k, replace=False).tolist())


def select(data: RunManifest, options: ReportOptions) -> Selection:
    chosen = Selection()
    ok = np.flatnonzero(data.equals("status", "ok"))
    chosen.sample = sample_rows(ok, options.sample, options.seed)
    chosen.lowest_by, order = quality_order(data, ok)
    chosen.lowest = order[: options.lowest].tolist()
    rank = np.full(data.n, data.n, np.int64)
    rank[order] = np.arange(len(order))
    flagged = np.flatnonzero(data.equals("qc_pass", False))
    flagged = flagged[np.lexsort((flagged, rank[flagged]))]  # worst first
    for i, reason in zip(flagged.tolist(), data.values("qc_reason", flagged)):
        for short in dict.fromkeys(short_reason(part) for part in split_reasons(reason)):
            chosen.by_reason.setdefault(short, []).append(i)
    chosen.by_reason = dict(sorted(chosen.by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])))
    chosen.failed = np.flatnonzero(data.equals("status", "error")).tolist()
    return chosen

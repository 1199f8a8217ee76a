"""What the report shows: every flagged image (one sheet per QC reason), the lowest-quality ok images, a random
sample of ok images, and every failure. Chosen from the manifest's columns alone."""

from __future__ import annotations

from dataclasses import dataclass, field

from lungmask_kit.qc import short_reason


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


def quality_order(data) -> tuple[str, list[int]]:
    """Ok rows, worst first: by est_dice when the run has it, else by ood_score (highest first), else by lung
    area (smallest first); rows without the value last, ties by manifest order."""
    ok = [i for i, s in enumerate(data.cols["status"]) if s == "ok"]
    for column, worst_first in (("est_dice", 1), ("ood_score", -1), ("ood_shape_score", -1), ("lung_area_fraction", 1)):
        values = data.cols.get(column)
        if values is not None and any(values[i] is not None for i in ok):
            known = sorted((i for i in ok if values[i] is not None), key=lambda i: (worst_first * values[i], i))
            return column, known + [i for i in ok if values[i] is None]
    return "", ok


def select(data, options) -> Selection:
    from lungmask_kit.report.build import sample_indices

    chosen = Selection()
    status = data.cols["status"]
    ok = [i for i, s in enumerate(status) if s == "ok"]
    chosen.sample = sample_indices(ok, options.sample, options.seed)
    chosen.lowest_by, order = quality_order(data)
    chosen.lowest = order[: options.lowest]
    rank = {i: r for r, i in enumerate(order)}
    qc_pass, reasons = data.cols.get("qc_pass", []), data.cols.get("qc_reason", [])
    for i, passed in enumerate(qc_pass):
        if passed is False:
            for part in (reasons[i] or "unspecified").split("; "):
                chosen.by_reason.setdefault(short_reason(part), []).append(i)
    for members in chosen.by_reason.values():
        members.sort(key=lambda i: (rank.get(i, len(rank)), i))
    chosen.by_reason = dict(sorted(chosen.by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])))
    chosen.failed = [i for i, s in enumerate(status) if s == "error"]
    return chosen

"""The report's pages (Jinja2 templates, autoescaped) and figures (matplotlib): index, one sheet per QC reason
(paged), the lowest-quality and random-sample sheets, and the failures (paged)."""

from __future__ import annotations

import re
from pathlib import Path

from lungmask_kit.report.build import FAILED_PER_PAGE, GROUP_COLUMNS, ReportOptions, RunData
from lungmask_kit.report.select import Selection

# manifest column -> (figure title, x label, QC threshold key, threshold name)
HISTOGRAMS = {
    "lung_area_fraction": ("Lung area fraction", "lung pixels / image pixels", "min_lung_fraction", "min_lung_fraction"),
    "est_dice": ("Estimated Dice (est_dice)", "estimated Dice of the mask", "min_est_dice", "min_est_dice"),
    "ood_score": ("Input gate (ood_score)", "ood_score (1.0 = calibrated edge)", "max_ood_score", "max_ood_score"),
    "ood_image_score": ("Image part of the gate", "ood_image_score", "max_ood_score", "max_ood_score"),
    "ood_shape_score": ("Mask-shape part of the gate", "ood_shape_score", "max_ood_score", "max_ood_score"),
}


def _environment():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("lungmask_kit.report", "templates"), autoescape=select_autoescape(["j2", "html"]),
                       undefined=StrictUndefined, trim_blocks=False, keep_trailing_newline=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "other"


def write_pages(data: RunData, chosen: Selection, cards: dict[int, dict], folder: Path, options: ReportOptions) -> int:
    """Every page into `folder`; returns how many pages were written."""
    env = _environment()
    common = {"thumb_side": options.thumb_side}
    written = 0
    reason_sheets = []
    for reason, rows in chosen.by_reason.items():
        stem = f"flagged-{slug(reason)}"
        pages = _sheet_pages(env, folder, stem, f"Flagged: {reason}", rows, data, cards, options, common,
                             f"Every image flagged for {reason}, worst first ({len(rows)}).")
        reason_sheets.append({"name": reason, "href": f"{stem}.html", "count": len(rows), "pages": pages})
        written += pages
    lowest_sheet = sample_sheet = None
    if chosen.lowest:
        written += _sheet_pages(env, folder, "lowest", "Lowest quality", chosen.lowest, data, cards, options, common,
                                f"The {len(chosen.lowest)} segmented images with the worst {chosen.lowest_by}, worst first.",
                                per_page=len(chosen.lowest))
        lowest_sheet = {"href": "lowest.html", "count": len(chosen.lowest), "by": chosen.lowest_by or "manifest order"}
    if chosen.sample:
        written += _sheet_pages(env, folder, "sample", "Random sample", chosen.sample, data, cards, options, common,
                                f"{len(chosen.sample)} segmented images drawn at random (seed {options.seed}), flagged or not.",
                                per_page=len(chosen.sample))
        sample_sheet = {"href": "sample.html", "count": len(chosen.sample)}
    failed_href = None
    if chosen.failed:
        written += _failed_pages(env, folder, chosen.failed, data, common)
        failed_href = "failed.html"
    figures = _figures(data, folder)
    env.get_template("index.html.j2").stream(
        title=f"lungkit QC report: {data.run.name}", facts=_facts(data), totals=_totals(data),
        reason_sheets=reason_sheets, lowest_sheet=lowest_sheet, sample_sheet=sample_sheet, failed_href=failed_href,
        seed=options.seed, figures=figures, tables=_tables(data), **common,
    ).dump(str(folder / "index.html"), encoding="utf-8")
    return written + 1


def _page_name(stem: str, number: int) -> str:
    return f"{stem}.html" if number == 1 else f"{stem}-{number}.html"


def _pager(stem: str, pages: int, here: int) -> list[dict]:
    return [{"number": n, "href": _page_name(stem, n), "here": n == here} for n in range(1, pages + 1)]


def _sheet_pages(env, folder, stem, title, rows, data, cards, options, common, description, per_page=None) -> int:
    per_page = max(1, per_page or options.per_page)
    chunks = [rows[k:k + per_page] for k in range(0, len(rows), per_page)] or [[]]
    template = env.get_template("sheet.html.j2")
    for number, chunk in enumerate(chunks, 1):
        title_n = title if len(chunks) == 1 else f"{title} (page {number} of {len(chunks)})"
        template.stream(title=title_n, description=description, pager=_pager(stem, len(chunks), number),
                        cards=[_card(data, i, cards[i]) for i in chunk], **common,
                        ).dump(str(folder / _page_name(stem, number)), encoding="utf-8")
    return len(chunks)


def _card(data: RunData, i: int, card: dict) -> dict:
    measures = []
    for column, name, fmt in (("est_dice", "est", "{:.3f}"), ("ood_score", "ood", "{:.2f}"),
                              ("ood_shape_score", "shape", "{:.2f}"), ("lung_area_fraction", "area", "{:.3f}")):
        value = data.value(column, i)
        if value is not None and not (column == "ood_shape_score" and data.value("ood_score", i) is not None):
            measures.append(f"{name} {fmt.format(value)}")
    label = " · ".join(str(v) for v in (data.value("label", i), data.value("view", i), data.value("source", i)) if v)
    return {**card, "path": data.cols["path"][i], "measures": " · ".join(measures) or "-", "label": label,
            "reason": data.value("qc_reason", i) or ("image not found" if card["placeholder"] else "")}


def _failed_pages(env, folder, failed, data, common) -> int:
    chunks = [failed[k:k + FAILED_PER_PAGE] for k in range(0, len(failed), FAILED_PER_PAGE)]
    template = env.get_template("failed.html.j2")
    for number, chunk in enumerate(chunks, 1):
        rows = [(data.cols["path"][i], data.value("error", i) or "") for i in chunk]
        template.stream(title="Failed images" + (f" (page {number} of {len(chunks)})" if len(chunks) > 1 else ""),
                        description=f"{len(failed)} image(s) could not be segmented; each error in one line.",
                        pager=_pager("failed", len(chunks), number), rows=rows, **common,
                        ).dump(str(folder / _page_name("failed", number)), encoding="utf-8")
    return len(chunks)


def _facts(data: RunData) -> list[tuple[str, str]]:
    meta, qc = data.meta, data.meta.get("qc") or {}
    facts = [("command", meta.get("command", "?")), ("lungkit", meta.get("lungkit_version", "?"))]
    if meta.get("model_name"):
        facts.append(("model", f"{meta['model_name']} ({str(meta.get('weights_sha256', ''))[:12]})"))
    facts.append(("input", meta.get("input_root", "?")))
    facts += [(k, f"{v:g}") for k, v in qc.items() if isinstance(v, (int, float))]
    if meta.get("finished_at"):
        facts.append(("finished", meta["finished_at"]))
    return facts


def _totals(data: RunData) -> dict:
    status, qc = data.cols["status"], data.cols.get("qc_pass", [])
    ok = sum(s == "ok" for s in status)
    flagged = sum(q is False for q in qc)
    return {"images": data.n, "ok": ok, "flagged": flagged, "failed": sum(s == "error" for s in status),
            "flagged_pct": f"{100 * flagged / ok:.1f}% of segmented" if ok else "-"}


def _tables(data: RunData) -> list[dict]:
    from lungmask_kit.qc import short_reason

    tables = []
    reasons: dict[str, int] = {}
    for passed, reason in zip(data.cols.get("qc_pass", []), data.cols.get("qc_reason", [])):
        if passed is False:
            for part in (reason or "unspecified").split("; "):
                reasons[short_reason(part)] = reasons.get(short_reason(part), 0) + 1
    if reasons:
        tables.append({"name": "QC reason", "header": ["images"], "rows": sorted(([k, v] for k, v in reasons.items()), key=lambda r: -r[1])})
    for column in ("status", *GROUP_COLUMNS):
        if column in data.cols and any(v is not None for v in data.cols[column]):
            tables.append(_group_table(data, column))
    return tables


def _group_table(data: RunData, column: str) -> dict:
    counts: dict[str, list[int]] = {}
    qc = data.cols.get("qc_pass", [None] * data.n)
    for value, status, passed in zip(data.cols[column], data.cols["status"], qc):
        c = counts.setdefault("(none)" if value is None else str(value), [0, 0, 0, 0])
        c[0] += 1
        c[1] += status == "ok"
        c[2] += passed is False
        c[3] += status == "error"
    rows = [[k, n, ok, flagged, failed, f"{100 * flagged / ok:.1f}%" if ok else "-"]
            for k, (n, ok, flagged, failed) in sorted(counts.items(), key=lambda kv: -kv[1][0])]
    return {"name": column, "header": ["images", "ok", "flagged", "failed", "flagged / ok"], "rows": rows}


def _figures(data: RunData, folder: Path) -> list[dict]:
    import cv2
    import numpy as np

    from lungmask_kit.plots import histogram_png

    qc, thresholds = data.cols.get("qc_pass", []), data.meta.get("qc") or {}
    (folder / "fig").mkdir(exist_ok=True)
    figures = []
    for column, (title, xlabel, key, name) in HISTOGRAMS.items():
        values = data.cols.get(column)
        if values is None or not any(v is not None for v in values):
            continue
        passed = [v for v, q in zip(values, qc) if v is not None and q is True]
        flagged = [v for v, q in zip(values, qc) if v is not None and q is False]
        shown = [v for v in passed + flagged if v > 0]
        log_x = column.startswith("ood") and bool(shown) and max(shown) / min(shown) > 50
        limit = thresholds.get(key)
        png = histogram_png(passed, flagged, title, xlabel, [(limit, name)] if limit is not None else [], log_x=log_x)
        (folder / "fig" / f"{column}.png").write_bytes(png)
        h, w = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
        figures.append({"src": f"fig/{column}.png", "w": w, "h": h, "alt": title})
    return figures

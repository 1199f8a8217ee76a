"""The report's pages (Jinja2 templates, autoescaped) and figures (matplotlib): index, one sheet per QC reason
(paged), the lowest-quality and random-sample sheets, and the failures (paged)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import cv2
import numpy as np
import pyarrow.compute as pc

from lungmask_kit.manifest import RunManifest
from lungmask_kit.plots import histogram_png
from lungmask_kit.qc import reason_counts
from lungmask_kit.report.options import GROUP_COLUMNS, ReportOptions
from lungmask_kit.report.select import Selection

if TYPE_CHECKING:
    from jinja2 import Environment

FAILED_PER_PAGE = 500

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


def sheet_stem(reason: str) -> str:
    """A flagged sheet's file stem: short (any reason length), unique (a hash of the reason: reasons that
    differ only in characters a slug drops stay apart) and stable across runs."""
    digest = hashlib.sha1(reason.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"flagged-{slug(reason)[:40].strip('-')}-{digest}"


def write_pages(data: RunManifest, chosen: Selection, cards: dict[int, dict], folder: Path, options: ReportOptions) -> int:
    """Every page into `folder`; returns how many pages were written."""
    env = _environment()
    common = {"thumb_side": options.thumb_side}
    out = _PageWriter(env, folder, data, cards, common)
    written = 0
    reason_sheets = []
    for reason, rows in chosen.by_reason.items():
        stem = sheet_stem(reason)
        pages = out.sheet(Sheet(stem, f"Flagged: {reason}", f"Every image flagged for {reason}, worst first ({len(rows)}).",
                                rows, options.per_page))
        reason_sheets.append({"name": reason, "href": f"{stem}.html", "count": len(rows), "pages": pages})
        written += pages
    lowest_sheet = sample_sheet = None
    if chosen.lowest:
        written += out.sheet(Sheet("lowest", "Lowest quality", f"The {len(chosen.lowest)} segmented images with the "
                                   f"worst {chosen.lowest_by}, worst first.", chosen.lowest, len(chosen.lowest)))
        lowest_sheet = {"href": "lowest.html", "count": len(chosen.lowest), "by": chosen.lowest_by or "manifest order"}
    if chosen.sample:
        written += out.sheet(Sheet("sample", "Random sample", f"{len(chosen.sample)} segmented images drawn at random "
                                   f"(seed {options.seed}), flagged or not.", chosen.sample, len(chosen.sample)))
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


@dataclass(frozen=True)
class Sheet:
    """A sheet of thumbnails: its file stem, title, one-line description, the rows it shows and how many a page."""

    stem: str
    title: str
    description: str
    rows: list[int]
    per_page: int


@dataclass(frozen=True)
class _PageWriter:
    """What every sheet page is written with: the templates, the folder, the run and its rendered cards."""

    env: Environment
    folder: Path
    data: RunManifest
    cards: dict[int, dict]
    common: dict

    def sheet(self, sheet: Sheet) -> int:
        """The sheet's pages (paged by `per_page`); returns how many."""
        per_page = max(1, sheet.per_page)
        chunks = [sheet.rows[k:k + per_page] for k in range(0, len(sheet.rows), per_page)] or [[]]
        template = self.env.get_template("sheet.html.j2")
        for number, chunk in enumerate(chunks, 1):
            title = sheet.title if len(chunks) == 1 else f"{sheet.title} (page {number} of {len(chunks)})"
            template.stream(title=title, description=sheet.description, pager=_pager(sheet.stem, len(chunks), number),
                            cards=_cards(self.data, chunk, self.cards), **self.common,
                            ).dump(str(self.folder / _page_name(sheet.stem, number)), encoding="utf-8")
        return len(chunks)


CARD_COLUMNS = ("path", "est_dice", "ood_score", "ood_shape_score", "lung_area_fraction", "ctr", "label", "view", "source",
                "qc_reason")


def _cards(data: RunManifest, rows: list[int], rendered: dict[int, dict]) -> list[dict]:
    """What each thumbnail's caption says: path, quality measures, label / view / source, QC reasons."""
    values = {c: data.values(c, rows) for c in CARD_COLUMNS}
    cards = []
    for k, i in enumerate(rows):
        v = {c: values[c][k] for c in CARD_COLUMNS}
        measures = [f"{name} {fmt.format(v[c])}" for c, name, fmt in (
            ("est_dice", "est", "{:.3f}"), ("ood_score", "ood", "{:.2f}"), ("ood_shape_score", "shape", "{:.2f}"),
            ("lung_area_fraction", "area", "{:.3f}"), ("ctr", "CTR", "{:.2f}")) if v[c] is not None and not (c == "ood_shape_score" and v["ood_score"] is not None)]
        card = rendered[i]
        cards.append({**card, "path": v["path"], "measures": " · ".join(measures) or "-",
                      "label": " · ".join(str(v[c]) for c in ("label", "view", "source") if v[c]),
                      "reason": v["qc_reason"] or "", "problem": card.get("problem") or ""})
    return cards


def _failed_pages(env, folder, failed, data, common) -> int:
    chunks = [failed[k:k + FAILED_PER_PAGE] for k in range(0, len(failed), FAILED_PER_PAGE)]
    template = env.get_template("failed.html.j2")
    for number, chunk in enumerate(chunks, 1):
        rows = list(zip(data.values("path", chunk), (e or "" for e in data.values("error", chunk))))
        template.stream(title="Failed images" + (f" (page {number} of {len(chunks)})" if len(chunks) > 1 else ""),
                        description=f"{len(failed)} image(s) could not be segmented; each error in one line.",
                        pager=_pager("failed", len(chunks), number), rows=rows, **common,
                        ).dump(str(folder / _page_name("failed", number)), encoding="utf-8")
    return len(chunks)


def _facts(data: RunManifest) -> list[tuple[str, str]]:
    meta, qc = data.meta, data.meta.get("qc") or {}
    facts = [("command", meta.get("command", "?")), ("lungkit", meta.get("lungkit_version", "?"))]
    if meta.get("model_name"):
        facts.append(("model", f"{meta['model_name']} ({str(meta.get('weights_sha256', ''))[:12]})"))
    facts.append(("input", meta.get("input_root", "?")))
    facts += [(k, f"{v:g}") for k, v in qc.items() if isinstance(v, (int, float))]
    if meta.get("finished_at"):
        facts.append(("finished", meta["finished_at"]))
    return facts


def _totals(data: RunManifest) -> dict:
    ok, flagged = int(data.equals("status", "ok").sum()), int(data.equals("qc_pass", False).sum())
    return {"images": data.n, "ok": ok, "flagged": flagged, "failed": int(data.equals("status", "error").sum()),
            "flagged_pct": f"{100 * flagged / ok:.1f}% of segmented" if ok else "-"}


def _tables(data: RunManifest) -> list[dict]:
    tables = []
    reasons = reason_counts(data.values("qc_reason", np.flatnonzero(data.equals("qc_pass", False))))
    if reasons:
        tables.append({"name": "QC reason", "header": ["images"], "rows": sorted(([k, v] for k, v in reasons.items()), key=lambda r: -r[1])})
    for column in ("status", *GROUP_COLUMNS):
        if data.has(column):
            tables.append(_group_table(data, column))
    return tables


def _group_table(data: RunManifest, column: str) -> dict:
    """Images, ok, flagged, failed and the flag rate per value of a column (counted with numpy, not per row)."""

    encoded = pc.dictionary_encode(data.table.column(column).cast("string")).combine_chunks()
    codes = pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64) + 1  # 0: null
    names = ["(none)"] + encoded.dictionary.to_pylist()
    count = {key: np.bincount(codes, weights=weights, minlength=len(names)).astype(int) for key, weights in (
        ("n", None), ("ok", data.equals("status", "ok")), ("flagged", data.equals("qc_pass", False)),
        ("failed", data.equals("status", "error")))}
    rows = [[names[k], count["n"][k], count["ok"][k], count["flagged"][k], count["failed"][k],
             f"{100 * count['flagged'][k] / count['ok'][k]:.1f}%" if count["ok"][k] else "-"]
            for k in np.argsort(-count["n"], kind="stable") if count["n"][k]]
    return {"name": column, "header": ["images", "ok", "flagged", "failed", "flagged / ok"], "rows": rows}


def _figures(data: RunManifest, folder: Path) -> list[dict]:
    thresholds = data.meta.get("qc") or {}
    passed_rows, flagged_rows = data.equals("qc_pass", True), data.equals("qc_pass", False)
    (folder / "fig").mkdir(exist_ok=True)
    figures = []
    for column, (title, xlabel, key, name) in HISTOGRAMS.items():
        if not data.has(column):
            continue
        values = data.numbers(column)
        passed = values[passed_rows & ~np.isnan(values)]
        flagged = values[flagged_rows & ~np.isnan(values)]
        shown = np.concatenate([passed, flagged])
        shown = shown[shown > 0]
        log_x = column.startswith("ood") and shown.size > 0 and shown.max() / shown.min() > 50
        limit = thresholds.get(key)
        png = histogram_png(passed, flagged, title, xlabel, [(limit, name)] if limit is not None else [], log_x=log_x)
        (folder / "fig" / f"{column}.png").write_bytes(png)
        h, w = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED).shape[:2]
        figures.append({"src": f"fig/{column}.png", "w": w, "h": h, "alt": title})
    return figures

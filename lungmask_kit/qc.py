"""QC flags computed from manifest columns alone, so a new threshold re-flags a run without re-segmenting.

Besides the mask's own measures, the image's declared kind counts: a modality that is not a projection
radiograph (a DICOM's Modality, or a label file's modality column) and a lateral view are flagged, whatever
the mask looks like.

Every reason that applies is listed in `qc_reason`, joined by REASON_SEPARATOR, which no reason contains (a
label's value quoted in a reason is cleaned first); `split_reasons` is the one parser. `qc_pass` is false when
there is a reason; failed rows keep `qc_pass` null.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass

from lungmask_kit import defaults
from lungmask_kit.anatomy.heart import cardiothoracic_ratio
from lungmask_kit.dicom import RADIOGRAPH_MODALITIES, is_lateral
from lungmask_kit.quality import VIEW_WORDS

# how label files spell a projection radiograph besides the DICOM codes (e.g. cxr-ood's list.csv: "X-ray")
_RADIOGRAPH_SPELLINGS = set(RADIOGRAPH_MODALITIES) | {"XRAY", "X-RAY", "X RAY", "RG", "DR", "CXR"}
REASON_SEPARATOR = "; "
_QUOTED_MAX = 40  # characters of a label value quoted in a reason


def quoted_value(value) -> str:
    """A label file's value as a reason quotes it: printable, without the separator, at most _QUOTED_MAX
    characters (a 300-character modality must not become a 300-character reason, sheet or file name)."""
    text = re.sub(r"[\x00-\x1f\x7f;]+", " ", str(value))
    text = " ".join(text.split())
    return text if len(text) <= _QUOTED_MAX else text[: _QUOTED_MAX - 1] + "\u2026"


@dataclass(frozen=True)
class QCThresholds:
    min_lung_fraction: float = defaults.MIN_LUNG_FRACTION
    max_ood_score: float | None = None  # None: no gate (a model without quality statistics)
    min_est_dice: float | None = None  # None: est_dice not used for QC
    flag_ctr_above: float | None = None  # None: the cardiothoracic ratio flags nothing (segment --flag-ctr-above)

    def as_dict(self) -> dict:
        return asdict(self)


def kind_reasons(row: dict) -> list[str]:
    """Reasons from what the image declares itself to be (columns modality and view), before any mask."""
    reasons = []
    modality = row.get("modality")
    if modality and modality.strip().upper() not in _RADIOGRAPH_SPELLINGS:
        reasons.append(f"not a radiograph (modality {quoted_value(modality)}: {' or '.join(RADIOGRAPH_MODALITIES)} expected)")
    if is_lateral(row.get("view")):
        reasons.append(f"lateral view (view {quoted_value(row['view'])}): the model segments frontal views")
    return reasons


def shown(value: float, limit: float, digits: int) -> str:
    """`value` with at least `digits` decimals and as many more (up to 8) as it takes to differ visibly from the
    `limit` it crossed: a reason never reads "1.00 > 1"."""
    for d in range(digits, 9):
        if round(value, d) != round(limit, d):
            return f"{value:.{d}f}"
    return f"{value:.8g}"


def qc_reasons(row: dict, t: QCThresholds) -> list[str]:
    """The QC reasons of one ok manifest row (declared kind, lung area, input gate, estimated Dice, and the
    cardiothoracic ratio `ctr` when the row has one and `flag_ctr_above` is set)."""
    reasons = kind_reasons(row)
    fraction = row.get("lung_area_fraction")
    if fraction is not None:
        if fraction == 0:
            reasons.append("no lung detected")
        elif fraction < t.min_lung_fraction:
            reasons.append(f"lung area fraction {shown(fraction, t.min_lung_fraction, 4)} < min_lung_fraction {t.min_lung_fraction:g}")
    if t.max_ood_score is not None:
        image, shape = row.get("ood_image_score"), row.get("ood_shape_score")
        if image is not None and image > t.max_ood_score:
            looks = VIEW_WORDS.get(row.get("view_guess"))
            reasons.append(f"not like the frontal chest X-rays the model knows ({f'looks like {looks}; ' if looks else ''}"
                           f"image ood score {shown(image, t.max_ood_score, 2)} > max_ood_score {t.max_ood_score:g})")
        if shape is not None and shape > t.max_ood_score:
            reasons.append(f"implausible lung shape for a frontal chest X-ray (shape ood score {shown(shape, t.max_ood_score, 2)} > "
                           f"max_ood_score {t.max_ood_score:g})")
    est = row.get("est_dice")
    if t.min_est_dice is not None and est is not None and est < t.min_est_dice:
        reasons.append(f"low estimated Dice {shown(est, t.min_est_dice, 3)} < min_est_dice {t.min_est_dice:g}")
    ctr = row.get("ctr")
    if t.flag_ctr_above is not None and ctr is not None and ctr > t.flag_ctr_above:
        reasons.append(f"cardiothoracic ratio {shown(ctr, t.flag_ctr_above, 3)} > flag_ctr_above {t.flag_ctr_above:g}")
    return reasons


# reasons that say the image may not be a frontal chest X-ray: its CTR is not reported
_NOT_FRONTAL = ("not a radiograph", "lateral view", "not like the frontal chest X-rays the model knows",
                "implausible lung shape for a frontal chest X-ray")


_FRONTAL_DOUBT = "flagged as possibly not a frontal chest X-ray"


def ctr_of(row: dict, t: QCThresholds) -> tuple[float | None, str | None]:
    """(ctr, ctr_null_reason) of an ok row from its widths: null where the writer found nothing to measure or
    an implausible heart (its reason kept), and where the image is flagged as possibly not a frontal CXR (a
    reason QC sets, and lifts when a new threshold passes the image)."""
    ctr = cardiothoracic_ratio(row.get("heart_width_px"), row.get("thorax_width_px"))
    written = row.get("ctr_null_reason")
    if ctr is None or (written and not written.startswith(_FRONTAL_DOUBT)):
        return None, written
    frontal_doubt = [r for r in qc_reasons({**row, "ctr": None}, t) if r.startswith(_NOT_FRONTAL)]
    if frontal_doubt:
        return None, f"{_FRONTAL_DOUBT} ({short_reason(frontal_doubt[0])})"
    return ctr, None


# how each qc_reason opens -> its name in the end-of-run summary
_SHORT = {
    "no lung detected": "no lung",
    "lung area fraction": "small lung area",
    "not like the frontal chest X-rays the model knows": "not a frontal CXR (image)",
    "implausible lung shape for a frontal chest X-ray": "implausible lung shape",
    "low estimated Dice": "low est_dice",
    "not a radiograph": "not a radiograph (modality)",
    "lateral view": "lateral view",
    "cardiothoracic ratio": "CTR above flag_ctr_above",
}


# what the view gate took an image for -> the words its short reason adds (a report sheet of its own each)
_LOOKS_SHORT = {VIEW_WORDS["lateral"]: "lateral?", VIEW_WORDS["cross-sectional"]: "CT/MR?", VIEW_WORDS["other"]: "other image?"}


def short_reason(reason: str) -> str:
    """One qc_reason part -> the few words the run summary counts it under (the image gate's with what the view
    gate took the image for, so that laterals and false alarms land on different report sheets)."""
    short = next((short for opening, short in _SHORT.items() if reason.startswith(opening)), reason)
    if short == "not a frontal CXR (image)":
        looks = next((s for words, s in _LOOKS_SHORT.items() if f"(looks like {words};" in reason), None)
        short = f"not a frontal CXR ({looks})" if looks else short
    return short


def split_reasons(text: str | None) -> list[str]:
    """A `qc_reason` -> its reasons ("unspecified" for a flagged row without one). A piece that does not open
    like a lungkit reason continues the previous one: manifests of earlier lungkit versions quoted "; " inside two
    reasons, and those must not count as reasons of their own."""
    reasons: list[str] = []
    for piece in (text or "unspecified").split(REASON_SEPARATOR):
        if reasons and not any(piece.startswith(opening) for opening in _SHORT):
            reasons[-1] += REASON_SEPARATOR + piece
        else:
            reasons.append(piece)
    return reasons


def reason_counts(texts) -> Counter:
    """How many flagged rows each short reason has (a row counts once per reason), from `qc_reason` values."""
    counts: Counter = Counter()
    for text in texts:
        counts.update({short_reason(r) for r in split_reasons(text)})
    return counts


def qc_update(thresholds: QCThresholds):
    """A manifest table update that (re)computes qc_pass / qc_reason from the table's own columns."""
    import pyarrow as pa

    def update(table):
        names = [n for n in ("lung_area_fraction", "ood_image_score", "view_guess", "ood_shape_score", "est_dice", "modality", "view",
                             "heart_width_px", "thorax_width_px", "ctr_null_reason") if n in table.column_names]
        columns = {n: table.column(n).to_pylist() for n in names}
        has_ctr = "ctr" in table.column_names and "heart_width_px" in columns
        qc_pass, reason = [], []
        ctrs, ctr_reasons = (table.column("ctr").to_pylist(), columns["ctr_null_reason"]) if has_ctr else ([], [])
        for i, status in enumerate(table.column("status").to_pylist()):
            if status != "ok" or columns["lung_area_fraction"][i] is None:
                qc_pass.append(None)
                reason.append(None)
                continue
            row = {n: columns[n][i] for n in names}
            if has_ctr:
                row["ctr"], row["ctr_null_reason"] = ctrs[i], ctr_reasons[i] = ctr_of(row, thresholds)
            found = qc_reasons(row, thresholds)
            qc_pass.append(not found)
            reason.append(REASON_SEPARATOR.join(found) or None)
        table = _set(table, "qc_pass", pa.array(qc_pass, pa.bool_()))
        table = _set(table, "qc_reason", pa.array(reason, pa.string()))
        if has_ctr:
            table = _set(_set(table, "ctr", pa.array(ctrs, pa.float64())), "ctr_null_reason", pa.array(ctr_reasons, pa.string()))
        return table

    return update


def _set(table, name: str, values):
    i = table.schema.get_field_index(name)
    return table.set_column(i, table.schema.field(i), values)

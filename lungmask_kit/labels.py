"""Label files: COVIDx txt (`patient_id filename label source`, space-separated) or CSV.

A CSV needs a path or filename column (also accepted: image, file); optional label / class / finding,
patient_id / patient, split columns. COVIDx files take their split from the file name (train.txt ->
train, test.txt -> test, val.txt -> val). Labels are matched to images by relative path, then by file
name when the name is unique among the images (or unique within a folder named after the row's split).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pyarrow as pa

from lungmask_kit.discovery import wants_dicom
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import atomic_write_bytes
from lungmask_kit.manifest import SEGMENT_FIELDS

_PATH_COLS = ("path", "filename", "image", "file", "relative_path")
_LABEL_COLS = ("label", "class", "finding")
_PATIENT_COLS = ("patient_id", "patient", "patientid")
_SPLITS = ("train", "val", "valid", "validation", "test")


@dataclass(frozen=True)
class LabelRow:
    path: str  # as written in the label file (POSIX)
    label: str | None
    patient_id: str | None
    split: str | None
    source_file: str
    extra: tuple[tuple[str, str | None], ...] = ()  # the file's other columns (source, licence, view, ...)


def _split_from_name(path: Path) -> str | None:
    stem = path.stem.lower()
    for s in _SPLITS:
        if stem == s or stem.endswith(("_" + s, "-" + s)) or stem.startswith((s + "_", s + "-")):
            return {"valid": "val", "validation": "val"}.get(s, s)
    return None


def _pick(header: list[str], names: tuple[str, ...]) -> str | None:
    lowered = {h.strip().lower(): h for h in header}
    return next((lowered[n] for n in names if n in lowered), None)


def read_label_file(path: str | Path) -> list[LabelRow]:
    path = Path(path)
    if not path.is_file():
        raise LungkitError(f"label file not found: {path}")
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    first = text.splitlines()[0] if text.strip() else ""
    if path.suffix.lower() == ".csv" or ("," in first and " " not in first.split(",")[0]):
        try:
            return _read_csv(path, text)
        except csv.Error as err:
            raise LungkitError(f"{path}: not a readable CSV ({err})") from err
    return _read_covidx(path, text)


def _read_covidx(path: Path, text: str) -> list[LabelRow]:
    split = _split_from_name(path)
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 3:
            raise LungkitError(f"{path}:{n}: expected 'patient_id filename label [source]', got {line!r}")
        extra = (("source", parts[3]),) if len(parts) > 3 else ()
        rows.append(LabelRow(parts[1], parts[2], parts[0], split, str(path), extra))
    return rows


def _read_csv(path: Path, text: str) -> list[LabelRow]:
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    path_col = _pick(header, _PATH_COLS)
    if path_col is None:
        raise LungkitError(f"{path}: a label CSV needs one of the columns {', '.join(_PATH_COLS)}")
    label_col, patient_col, split_col = _pick(header, _LABEL_COLS), _pick(header, _PATIENT_COLS), _pick(header, ("split",))
    file_split = _split_from_name(path)
    others = [h for h in header if h and h not in (path_col, label_col, patient_col, split_col)]
    return [
        LabelRow(
            r[path_col].strip().replace("\\", "/"),
            (r.get(label_col) or None) if label_col else None,
            (r.get(patient_col) or None) if patient_col else None,
            ((r.get(split_col) or None) if split_col else None) or file_split,
            str(path),
            tuple((h.strip(), r.get(h) or None) for h in others),
        )
        for r in reader
        if (r.get(path_col) or "").strip()
    ]


def read_labels(files: list[str | Path]) -> list[LabelRow]:
    rows: list[LabelRow] = []
    for f in files:
        rows += read_label_file(f)
    return rows


def match_labels(rel_paths: list[str], labels: list[LabelRow]) -> tuple[dict[str, LabelRow], list[LabelRow], list[LabelRow]]:
    """-> ({image relative path: label row}, label rows that match no image, label rows that conflict).

    Repeated rows that agree (label, patient_id, split) are one label. Rows that disagree about one image are
    conflicts: that image gets no label (never a silent first-wins) and every row involved is reported."""
    by_path = set(rel_paths)
    by_name: dict[str, list[str]] = {}
    for rel in rel_paths:
        by_name.setdefault(PurePosixPath(rel).name, []).append(rel)
    claims: dict[str, list[LabelRow]] = {}
    unmatched: list[LabelRow] = []
    for row in labels:
        key = str(PurePosixPath(row.path))
        if key not in by_path:
            candidates = by_name.get(PurePosixPath(key).name, [])
            if len(candidates) > 1 and row.split:  # COVIDx: train.txt names files under train/
                candidates = [c for c in candidates if row.split in PurePosixPath(c).parts[:-1]]
            key = candidates[0] if len(candidates) == 1 else None
        if key is None:
            unmatched.append(row)
        else:
            claims.setdefault(key, []).append(row)
    matched: dict[str, LabelRow] = {}
    conflicts: list[LabelRow] = []
    for key, rows in claims.items():
        if len({(r.label, r.patient_id, r.split) for r in rows}) == 1:
            matched[key] = rows[0]
        else:
            conflicts += [LabelRow(key, r.label, r.patient_id, r.split, r.source_file) for r in rows]
    return matched, unmatched, conflicts


def write_label_report(out: Path, unmatched: list[LabelRow], conflicts: list[LabelRow]) -> None:
    """OUT/unmatched_labels.csv: label rows that match no image (`no image`) or disagree about one (`conflict`)."""

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", "label", "patient_id", "split", "label_file", "problem"])
    for problem, rows in (("no image", unmatched), ("conflict", conflicts)):
        for r in rows:
            w.writerow([r.path, r.label, r.patient_id, r.split, r.source_file, problem])
    atomic_write_bytes(out / "unmatched_labels.csv", buf.getvalue().encode())


# header columns a label file may also give (e.g. cxr-cls's view): for a DICOM the label fills them where the
# header did not; for any other image (no header) the label file's value is the value
_LABEL_FILLS = ("view", "modality", "study_uid", "series_uid", "sop_uid")


def labels_update(matched: dict):
    """A manifest update from the label files: label and split are set (null for an unlabelled image);
    patient_id is the label's, else a DICOM's PatientID; the files' other columns (source, licence, finding,
    ...) become string columns; a header column (view, modality, ...) is filled where the image had none; a
    name the manifest measures itself (width, ...) keeps the manifest's value."""

    def set_strings(table, name, values):
        array = pa.array(values, pa.string())
        if name in table.column_names:
            i = table.column_names.index(name)
            return table.set_column(i, table.schema.field(i), array)
        return table.append_column(pa.field(name, pa.string()), array)

    def update(table):
        paths = table.column("path").to_pylist()
        labelled = [matched.get(p) for p in paths]
        for col in ("label", "split"):
            table = set_strings(table, col, [getattr(m, col) if m else None for m in labelled])
        own = table.column("patient_id").to_pylist()
        table = set_strings(table, "patient_id", [(m and m.patient_id) or o for m, o in zip(labelled, own)])
        extras = [dict(m.extra) if m else {} for m in labelled]
        names = sorted({k for e in extras for k in e} - ({f.name for f in SEGMENT_FIELDS} - set(_LABEL_FILLS)))
        for name in names:
            values = [e.get(name) for e in extras]
            if name in _LABEL_FILLS:  # a DICOM's own header wins; other images have none, so the label file's
                # value replaces an earlier one (a corrected view takes effect on the re-run)
                own = table.column(name).to_pylist()
                values = [o if o is not None and wants_dicom(p, True) else (v if v is not None else o)
                          for p, o, v in zip(paths, own, values)]
            table = set_strings(table, name, values)
        return table

    return update

"""The files that describe a published dataset: Hugging Face features in each shard's schema, the dataset card
(README.md with a Hugging Face YAML header and datasheet sections), `croissant.json` (MLCommons Croissant 1.1
with its Responsible-AI fields) and `SHA256SUMS`. Nothing in them names the machine that made them."""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

from lungmask_kit import __version__
from lungmask_kit.manifest import RunManifest
from lungmask_kit.publish.schema import HF_IMAGE, IDENTIFIER_COLUMNS, RLE, PublishOptions, PublishSummary, image_columns
from lungmask_kit.qc import reason_counts

LICENCE_COLUMNS = ("license", "licence")
_LICENCE_IDS = {  # how label files write a licence -> the Hugging Face licence id
    "cc by 4.0": "cc-by-4.0", "cc by 3.0": "cc-by-3.0", "cc by-sa 4.0": "cc-by-sa-4.0", "cc by-nc 4.0": "cc-by-nc-4.0",
    "cc by-nc-sa 4.0": "cc-by-nc-sa-4.0", "cc by-nc-nd 4.0": "cc-by-nc-nd-4.0", "cc0": "cc0-1.0", "cc0 1.0": "cc0-1.0",
    "mit": "mit", "apache-2.0": "apache-2.0",
}


def licence_id(text: str | None) -> str:
    """A licence as written -> a Hugging Face licence id: a known spelling, an id as it is, else `other`."""
    if not text:
        return "unknown"
    text = text.strip().lower()
    return _LICENCE_IDS.get(text) or (text if re.fullmatch(r"[a-z0-9][a-z0-9.+-]{0,63}", text) else "other")


def md(value) -> str:
    """A value from a manifest, a label file or the command line as inline Markdown text: one line, no table
    cell break, no heading, link, HTML or emphasis of its own (a label value must not add sections to the card)."""
    text = " ".join(str(value).split())
    return re.sub(r"([\\`*_{}\[\]()<>#+!|~])", r"\\\1", text)


def licence_summary(table: pa.Table, given: str | None) -> tuple[str, list[tuple[str, int]]]:
    """(licence id for the YAML header, [(licence as written, images)]): the user's --license when given; else
    the single licence every row shares; `other` when rows differ."""
    column = next((c for c in LICENCE_COLUMNS if c in table.column_names), None)
    counts = Counter(table.column(column).to_pylist()).most_common() if column else []
    counts = [(k if k else "unspecified", n) for k, n in counts]
    if given:
        return licence_id(given), counts
    if len(counts) == 1:
        return licence_id(counts[0][0]), counts
    return ("other" if counts else "unknown"), counts


def size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def dataset_name(source: RunManifest, options: PublishOptions) -> str:
    return options.name or source.run.name


def _counts(table: pa.Table, column: str) -> list[tuple[str, int]]:
    if column not in table.column_names or table.column(column).null_count == len(table):
        return []
    return [(("(none)" if k is None else str(k)), n) for k, n in Counter(table.column(column).to_pylist()).most_common()]


def _reasons(table: pa.Table) -> list[tuple[str, int]]:
    if "qc_reason" not in table.column_names:
        return []
    return reason_counts(r for r in table.column("qc_reason").to_pylist() if r).most_common()


def _table_md(title: str, rows: list[tuple[str, int]]) -> list[str]:
    if not rows:
        return []
    return [f"| {title} | images |", "|---|---:|", *(f"| {md(k)} | {n} |" for k, n in rows), ""]


def write_card(folder: Path, source: RunManifest, table: pa.Table, summary: PublishSummary, options: PublishOptions,
               files: list[str]) -> None:
    """README.md: a Hugging Face YAML header and a datasheet."""
    meta, name = source.meta, dataset_name(source, options)
    licence, licences = licence_summary(table, options.license)
    splits = sorted(summary.rows)
    header = ["---", f"pretty_name: {json.dumps(name)}", f"license: {json.dumps(licence)}",
              "task_categories:", "- image-segmentation", *(["- image-classification"] if _counts(table, "label") else []),
              "tags:", "- medical", "- chest-x-ray", "- lung-segmentation", "- lungkit",
              f"size_categories:\n- {size_category(table.num_rows)}", "configs:", "- config_name: default", "  data_files:",
              *(f"  - split: {s}\n    path: data/{s}-*" for s in splits), "---", ""]
    body = _card_body(name, meta, table, summary, options, licence, licences, files)
    (folder / "README.md").write_text("\n".join(header + body) + "\n", encoding="utf-8")


_CONVENTION_WORDS = {"v7": "the whole lung, the part behind the heart and below the dome included (V7 Labs' convention)",
                     "jsrt": "the visible lung fields only, the lung behind the heart excluded (as JSRT/SCR, Montgomery, "
                     "Shenzhen and CheXmask annotate)"}


def _convention_line(table: pa.Table) -> str:
    """What the masks outline, from the manifest's `convention` column."""
    if "convention" not in table.column_names:
        return "- Annotation convention: not recorded (masks made before lungkit recorded it, or from elsewhere)."
    said = sorted({c for c in table.column("convention").to_pylist() if c})
    if not said:
        return "- Annotation convention: not recorded (masks from elsewhere)."
    # a value that is not one of lungkit's conventions is the manifest's text, shown as plain escaped text
    return "- Annotation convention: " + "; ".join(
        f"`{c}`: {_CONVENTION_WORDS[c]}" if c in _CONVENTION_WORDS else f"{md(c)} (not a convention lungkit knows)"
        for c in said) + "."


def _card_body(name: str, meta: dict, table: pa.Table, summary: PublishSummary, options: PublishOptions, licence: str,
               licences: list[tuple[str, int]], files: list[str]) -> list[str]:
    mode = summary.mode
    calibration = (meta.get("quality") or {}).get("calibration") or {}
    qc = meta.get("qc") or {}
    lines = [f"# {md(name)}", "",
             f"Lung masks{'' if mode == 'masks-only' else ', lungs-only and lungs-removed images'} of {table.num_rows} chest "
             f"X-rays, made with lungkit {meta.get('lungkit_version', '?')} (`lungkit {meta.get('command', 'segment')}` then "
             f"`lungkit publish{' --masks-only' if mode == 'masks-only' else ''}`).", "",
             "## Motivation", "",
             "Derived corpora for checking whether a chest X-ray classifier looks at the lungs: train and compare it on "
             "the original images, the lungs only (image AND mask) and the lungs removed (image AND NOT mask).", "",
             "## Composition", ""]
    lines += [f"- Splits: {', '.join(f'{s} ({n})' for s, n in sorted(summary.rows.items()))}."]
    if mode == "full":
        cropped = "crop_box" in table.column_names and table.column("crop_box").null_count < len(table)
        variants_size = ("cropped to the lungs' bounding box, which `crop_box` gives as [y0, y1, x0, x1] (half-open) in "
                         "the image's pixels; same depth as the image" if cropped else "same size and depth as the image")
        lines += ["- Each row: `image` (the source image as PNG, 16-bit where the source is), `mask` (PNG, 0 background / "
                  f"255 lung, native size), `lungs`, `nolungs` (PNG, {variants_size}), and the manifest's "
                  "columns (lungkit's `manifests/SCHEMA.md`)."]
    else:
        lines += ["- Each row: `mask_rle` (the mask as a COCO run-length encoding: `size` = [height, width], `counts` = "
                  "pycocotools' compressed RLE string, column-major), `path` (the source image relative to its corpus "
                  "root) and `sha256` (of the source file), and the manifest's columns. No image is included: rebuild "
                  "lungs / lungs-removed images with `lungkit variants DATASET --input-root YOUR_IMAGES -o OUT`, which "
                  "checks every image's sha256."]
    lines += [_convention_line(table)]
    if "right_lung_rle" in table.column_names:
        lines += ["- Each lung: `right_lung_rle` and `left_lung_rle` (COCO RLEs as above; the patient's right lung is on "
                  "the image's left in a PA/AP view; disjoint, their union is the mask), `right_lung_fraction`, "
                  "`left_lung_fraction` (of the image area) and `right_lung_mm2`, `left_lung_mm2` (where a DICOM gave "
                  "the pixel spacing; null otherwise)."]
    if "heart_rle" in table.column_names and table.column("heart_rle").null_count < table.num_rows:
        lines += ["- The heart: `heart_rle` (COCO RLE as above" + ("; also `heart` as PNG" if mode == "full" else "")
                  + "), `heart_fraction`, `heart_mm2`, and the cardiothoracic ratio `ctr`: the heart's widest horizontal "
                  "extent (`heart_width_px`) over that of both visible lung fields (`thorax_width_px`, from the model's "
                  "jsrt-convention lungs whatever the lung masks' convention). `ctr` is null where it was not measurable "
                  "or the image was flagged as possibly not frontal (`ctr_null_reason` says which); a measurement by a "
                  "model, not a diagnosis."]
    lines += [f"- Left out: {summary.excluded_failed} image(s) that failed, "
              + (f"{summary.excluded_flagged} flagged by QC." if not options.include_flagged else
                 "none flagged by QC (flagged images are included; `qc_pass`/`qc_reason` say which).")]
    lines += ["", *_table_md("label", _counts(table, "label")), *_table_md("split", _counts(table, "split")),
              *_table_md("source", _counts(table, "source")), *_table_md("QC reason (included flagged images)", _reasons(table))]
    lines += ["## Collection process", "",
              f"- lungkit {meta.get('lungkit_version', '?')}, model `{meta.get('model_name', 'masks from elsewhere')}`"
              + (f" (weights sha256 `{meta['weights_sha256']}`)" if meta.get("weights_sha256") else "") + ".",
              f"- Settings key `{meta.get('settings_key', '?')}`; post-processing {json.dumps(meta.get('postprocess', {}))}.",
              f"- QC thresholds: {json.dumps(qc)}.", "",
              "## Preprocessing", "",
              "Grayscale at native bit depth (colour converted to luminance; a DICOM's Modality LUT applied, MONOCHROME1 "
              "inverted); the model saw each image resized to its input size and normalised; masks were cleaned (small "
              "objects removed, small holes filled) and brought back to native size.", "",
              "## Known limits", "",
              "- The masks follow the annotation convention of the model's training data (the bundled model: V7 Labs' "
              "outlines, which include the lung behind the heart shadow); other conventions differ by a few Dice points.",
              f"- Measured quality: {_quality_sentence(calibration, qc)}",
              "- `est_dice` is the model's own estimate of each mask's Dice against a careful annotation, not a measurement; "
              "`ood_score` above 1 means the image is unlike the frontal chest X-rays the model was calibrated on.", "",
              "## Uses", "",
              "Shortcut audits of chest X-ray classifiers, lung-region analyses, pre-training lung segmenters. Not for "
              "clinical use: no mask here was checked by a clinician.", "",
              "## Personal and sensitive information", "", _identifiers_sentence(table, summary, options.keep_identifiers), "",
              "## Licences", ""]
    if licences:
        lines += [f"Licence of the images, per source row (`license` column); the card's licence is `{licence}`:", "",
                  *_table_md("licence", licences)]
    else:
        lines += [f"`{licence}`" + (f" (given by the publisher: {md(options.license)})." if options.license else
                  " (no licence column in the manifest, and none given with --license: ask the source's owners before "
                  "sharing this dataset)."), ""]
    lines += ["## Files", "", f"{len(files)} Parquet file(s) under `data/`, `croissant.json` (MLCommons Croissant 1.1), "
              "`SHA256SUMS` (`sha256sum -c SHA256SUMS` checks every file)."
              + (" `chexmask.csv`: the masks in CheXmask's layout (`Right Lung`, `Left Lung` as run-length strings, "
                 "starts 1-indexed, row by row; `Heart` the same where the model drew the heart, else empty); its "
                 "`Dice RCA (Mean)` column "
                 "holds lungkit's `est_dice`, an estimate of each mask's Dice like CheXmask's RCA, not CheXmask's "
                 "RCA itself." if options.chexmask else ""), "",
              "## Citation", "", "Cite the sources of the images" + (" (see the licence table)" if licences else "")
              + ", this dataset and lungkit (add the URL where you publish the dataset to its entry):", "",
              "```bibtex", *citation(name, meta, table.num_rows), "```"]
    return lines


def citation(name: str, meta: dict, rows: int) -> list[str]:
    """BibTeX for the dataset and for lungkit: author, year, title and version; no URL lungkit cannot know."""
    year = (meta.get("finished_at") or time.strftime("%Y"))[:4]
    key = re.sub(r"\W+", "_", name).strip("_").lower() or "dataset"
    title = re.sub(r"[{}\\]", "", name)
    version = meta.get("lungkit_version", __version__)
    return [f"@misc{{{key}_{year},", f"  title = {{{title}: lung masks of {rows} chest X-rays}},",
            "  author = {{the dataset's publishers}},", f"  year = {{{year}}},",
            f"  note = {{Made with lungkit {version} (`lungkit {meta.get('command', 'segment')}`, `lungkit publish`)}},",
            "}", "@software{lungkit,", "  title = {lungkit: batch lung masks for chest X-ray datasets},",
            "  author = {{lungkit contributors}},", f"  year = {{{year}}},", f"  version = {{{version}}},", "}"]


def _identifiers_sentence(table: pa.Table, summary: PublishSummary, keep_identifiers: bool) -> str:
    """What the dataset says of its patients, exactly as published."""
    present = [c for c in IDENTIFIER_COLUMNS if c in table.column_names and table.column(c).null_count < len(table)]
    names = ", ".join(f"`{c}`" for c in present)
    if keep_identifiers:
        return ((f"{names}: published as in the source; " if present else "") + "paths and the original PNGs' text "
                "chunks as in the source (`lungkit publish --keep-identifiers`): they identify patients unless the "
                "source was de-identified.")
    parts = [f"{names}: replaced by pseudonyms (a keyed hash whose key was discarded after publishing): rows of one "
             "patient or study share a pseudonym within this dataset, and no pseudonym can be traced back to its value."
             if present else "No patient identifier column (patient_id, DICOM UIDs) is published."]
    if summary.mode == "full":
        parts.append(f"In `path`, folder and file names equal to an identifier value or shaped like a DICOM UID are "
                     f"replaced by pseudonyms the same way ({summary.paths_pseudonymised} path(s)); other names are "
                     "kept as they were. The original PNGs are published without their text chunks, EXIF and time "
                     "stamps (pixels untouched).")
    else:
        parts.append("`path` is published as in the source, since it is how users of this dataset find their own "
                     "copies of the images: a folder or file name that carries an identifier stays in it.")
    parts.append("`sha256` (of each source file) is kept: whoever holds a source file can find its row.")
    return " ".join(parts)


def _quality_sentence(calibration: dict, qc: dict) -> str:
    parts = []
    if calibration.get("val_dice_mean") is not None:
        parts.append(f"mean Dice {calibration['val_dice_mean']:.3f} on the model's {calibration.get('n_val_images', '?')} "
                     f"validation images ({calibration.get('n_val_patients', '?')} patients)")
    cv = calibration.get("est_dice_cv")
    if cv:
        parts.append(f"est_dice tracks the measured Dice with Spearman {cv['spearman']:.2f} and mean absolute error "
                     f"{cv['mae']:.3f} ({calibration.get('est_dice_cv_method', 'cross-validated')})")
    if qc.get("min_est_dice") is not None:
        parts.append(f"images under est_dice {qc['min_est_dice']:g} are flagged")
    return ("; ".join(parts) or "see the model card of the model named above") + "."


# --- Croissant ---

_CONTEXT = {
    "@language": "en", "@vocab": "https://schema.org/", "sc": "https://schema.org/",
    "cr": "http://mlcommons.org/croissant/", "rai": "http://mlcommons.org/croissant/RAI/",
    "dct": "http://purl.org/dc/terms/", "citeAs": "cr:citeAs", "column": "cr:column", "conformsTo": "dct:conformsTo",
    "data": {"@id": "cr:data", "@type": "@json"}, "dataType": {"@id": "cr:dataType", "@type": "@vocab"},
    "examples": {"@id": "cr:examples", "@type": "@json"}, "extract": "cr:extract", "field": "cr:field",
    "fileProperty": "cr:fileProperty", "fileObject": "cr:fileObject", "fileSet": "cr:fileSet", "format": "cr:format",
    "includes": "cr:includes", "isLiveDataset": "cr:isLiveDataset", "jsonPath": "cr:jsonPath", "key": "cr:key",
    "md5": "cr:md5", "parentField": "cr:parentField", "path": "cr:path", "recordSet": "cr:recordSet",
    "references": "cr:references", "regex": "cr:regex", "repeated": "cr:repeated", "replace": "cr:replace",
    "separator": "cr:separator", "source": "cr:source", "subField": "cr:subField", "transform": "cr:transform",
    "samplingRate": "cr:samplingRate", "equivalentProperty": "cr:equivalentProperty",
}
_CR_TYPES = {"string": "sc:Text", "large_string": "sc:Text", "bool": "sc:Boolean", "int8": "sc:Integer",
             "int16": "sc:Integer", "int32": "sc:Integer", "int64": "sc:Integer", "float": "sc:Float",
             "double": "sc:Float"}


_RLE_COLUMNS = {"mask_rle": "the lung mask", "right_lung_rle": "the patient's right lung (the image's left in a PA/AP view)",
                "left_lung_rle": "the patient's left lung", "heart_rle": "the heart"}


def _cr_field(name: str, t: pa.DataType) -> dict | None:
    source = {"fileSet": {"@id": "parquet-files"}, "extract": {"column": name}}
    base = {"@type": "cr:Field", "@id": f"default/{name}", "name": name}
    if t == HF_IMAGE:
        return {**base, "description": f"{name} as PNG", "dataType": "sc:ImageObject",
                "source": {**source, "transform": {"jsonPath": "bytes"}}}
    if pa.types.is_struct(t) and name in _RLE_COLUMNS:
        return {**base, "description": f"COCO run-length encoding of {_RLE_COLUMNS[name]} (pycocotools compressed RLE, "
                "column-major; size = [height, width])", "dataType": "sc:Text",
                "source": {**source, "transform": {"jsonPath": "counts"}}}
    if str(t) in _CR_TYPES:
        return {**base, "dataType": _CR_TYPES[str(t)], "source": source}
    return None  # lists (pixel_spacing, crop_box): in the Parquet files, not described field by field here


def write_croissant(folder: Path, source: RunManifest, table: pa.Table, summary: PublishSummary, options: PublishOptions,
                    files: list[str]) -> None:
    meta, name = source.meta, dataset_name(source, options)
    licence, licences = licence_summary(table, options.license)
    schema = table.schema
    if summary.mode == "full":
        schema = pa.schema(list(schema) + [pa.field(c, HF_IMAGE) for c in image_columns(table)])
    else:
        schema = pa.schema(list(schema) + [pa.field("mask_rle", RLE)])
    fields = [f for f in (_cr_field(fld.name, fld.type) for fld in schema) if f is not None]
    doc = {
        "@context": _CONTEXT, "@type": "sc:Dataset", "name": name,
        "conformsTo": ["http://mlcommons.org/croissant/1.1", "http://mlcommons.org/croissant/RAI/1.0"],
        "description": f"Lung masks of {table.num_rows} chest X-rays made with lungkit ({summary.mode} mode); see README.md.",
        "license": licence,
        "version": "1.0.0", "citeAs": "\n".join(citation(name, meta, table.num_rows)),
        "datePublished": meta.get("finished_at", "")[:10] or None,
        "keywords": ["chest X-ray", "lung segmentation", "medical imaging"],
        "rai:dataCollection": "Masks predicted by a lung segmentation model over an existing chest X-ray corpus; no new "
                              "images were acquired.",
        "rai:dataCollectionType": ["Machine-generated"],
        "rai:dataPreprocessingProtocol": ["Grayscale at native depth; resize to the model's input; threshold, remove small "
                                          "objects, fill small holes; masks resized back to native size."],
        "rai:dataAnnotationProtocol": f"Model {meta.get('model_name', 'external masks')} (lungkit {meta.get('lungkit_version', '?')}); "
                                      "no human checked individual masks.",
        "rai:machineAnnotationTools": [f"lungkit {meta.get('lungkit_version', __version__)}, model "
                                       f"{meta.get('model_name', 'none (masks from elsewhere)')}"],
        "rai:annotationsPerItem": "One lung mask per image (split into the right and left lung), made by a model; "
                                  "no image was annotated by a person for this dataset.",
        "rai:dataAnnotationAnalysis": [_quality_sentence((meta.get("quality") or {}).get("calibration") or {},
                                                         meta.get("qc") or {})],
        "rai:dataCollectionMissingData": [f"{summary.excluded_failed} image(s) that failed to segment and "
                                          + (f"{summary.excluded_flagged} flagged by QC are left out."
                                             if not options.include_flagged else "none flagged by QC are left out "
                                             "(flagged images are included, marked by qc_pass).")],
        "rai:dataImputationProtocol": "None: nothing is imputed; a missing value is null.",
        "rai:dataLimitations": ["Masks follow the annotation convention of the model's training data.",
                                "est_dice is an estimate, not a measurement; QC flags are heuristics."],
        "rai:dataBiases": ["The source corpus's mix of sites, devices and diseases carries over; the images per label, "
                           "split and source are counted in README.md."],
        "rai:personalSensitiveInformation": ["Medical images. " + _identifiers_sentence(table, summary, options.keep_identifiers)],
        "rai:dataUseCases": ["Shortcut audits of chest X-ray classifiers; lung-region analyses. Not for clinical use."],
        "rai:dataSocialImpact": "Helps show whether diagnostic classifiers rely on cues outside the lungs.",
        "rai:dataReleaseMaintenancePlan": ["Regenerate with lungkit publish from the run; SHA256SUMS pins every file."],
        "distribution": [{"@type": "cr:FileSet", "@id": "parquet-files", "name": "parquet-files",
                          "encodingFormat": "application/x-parquet", "includes": "data/*.parquet"}],
        "recordSet": [{"@type": "cr:RecordSet", "@id": "default", "name": "default",
                       "description": "One record per published image.", "field": fields}],
    }
    if licences:
        doc["rai:dataLimitations"].append("Image licences differ per row: " + ", ".join(f"{k} ({n})" for k, n in licences))
    (folder / "croissant.json").write_text(json.dumps({k: v for k, v in doc.items() if v is not None}, indent=2) + "\n",
                                           encoding="utf-8")


def write_sha256sums(folder: Path) -> None:
    """`sha256sum -c` format over every file but itself, sorted, paths relative to the dataset folder."""
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        lines.append(f"{digest.hexdigest()}  {path.relative_to(folder).as_posix()}")
    (folder / "SHA256SUMS").write_text("\n".join(lines) + "\n", encoding="utf-8")

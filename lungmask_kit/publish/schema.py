"""What a published dataset is made of, shared by the build, the payloads and the card: the Arrow types of its
image and mask columns, their Hugging Face `datasets` features, the identifier columns, the options and the
summary."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from lungmask_kit.manifest import RLE_TYPE

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
RLE = RLE_TYPE
IMAGE_COLUMNS = ("image", "mask", "lungs", "nolungs")
HEART_IMAGE = "heart"  # a fifth image column (full mode) where the run drew the heart


def image_columns(table: pa.Table) -> tuple[str, ...]:
    """The image columns a full-mode dataset of these manifest rows has: the heart's where they have heart masks."""
    has_heart = "heart_rle" in table.column_names and table.column("heart_rle").null_count < table.num_rows
    return (*IMAGE_COLUMNS, HEART_IMAGE) if has_heart else IMAGE_COLUMNS
# columns that can identify a patient (DICOM PatientID and UIDs, or a label file's patient_id): pseudonymised
# in a published dataset unless --keep-identifiers
IDENTIFIER_COLUMNS = ("patient_id", "study_uid", "series_uid", "sop_uid")
_HF_DTYPES = {pa.string(): "string", pa.large_string(): "large_string", pa.bool_(): "bool", pa.int8(): "int8",
              pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64", pa.float32(): "float32",
              pa.float64(): "float64", pa.binary(): "binary"}


@dataclass
class PublishOptions:
    masks_only: bool = False
    include_flagged: bool = False
    name: str | None = None  # dataset name (default: the run folder's name)
    license: str | None = None  # licence id for the card (default: summarised from a licence column)
    shard_mb: int = 500  # Parquet shard size, MB of image bytes (full mode)
    input_root: str | Path | None = None  # where the run's original images are now
    workers: int = 0  # reading threads (0: one per usable core)
    keep_identifiers: bool = False  # publish patient ids and DICOM UIDs as they are (default: pseudonyms)
    chexmask: bool = False  # also chexmask.csv: the masks in CheXmask's layout (est_dice in place of its RCA)
    progress: bool = True


@dataclass
class PublishSummary:
    folder: str
    mode: str
    rows: dict[str, int] = field(default_factory=dict)  # split -> published rows
    excluded_flagged: int = 0
    excluded_failed: int = 0
    files: int = 0
    total_bytes: int = 0
    resumed_shards: int = 0
    pseudonymised: list[str] = field(default_factory=list)  # identifier columns replaced by pseudonyms
    paths_pseudonymised: int = 0  # full mode: paths with an identifier in a folder or file name, replaced
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0


def hf_feature(t: pa.DataType) -> dict:
    """A Hugging Face `datasets` feature (as stored in Parquet metadata) for an Arrow type."""
    if t == HF_IMAGE:
        return {"_type": "Image"}
    if pa.types.is_struct(t):
        return {t.field(i).name: hf_feature(t.field(i).type) for i in range(t.num_fields)}
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return {"_type": "Sequence", "feature": hf_feature(t.value_type)}
    return {"dtype": _HF_DTYPES.get(t, str(t)), "_type": "Value"}


def hf_schema_metadata(schema: pa.Schema) -> dict:
    """The `huggingface` schema metadata that makes `datasets` load the image columns as `Image` features."""
    features = {f.name: hf_feature(f.type) for f in schema}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}

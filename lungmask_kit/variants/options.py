"""`lungkit variants`' settings and manifest columns."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lungmask_kit import defaults
from lungmask_kit.derive import VARIANTS
from lungmask_kit.manifest import SEGMENT_FIELDS, VARIANTS_EXTRA_FIELDS

FIELDS = SEGMENT_FIELDS + VARIANTS_EXTRA_FIELDS

OUTPUT_FORMAT = 3  # 2: ood_shape_score; 3: right and left lung columns



@dataclass
class VariantsOptions:
    crop: bool = False
    margin: int = 0
    min_lung_fraction: float = defaults.MIN_LUNG_FRACTION
    only: tuple[str, ...] = VARIANTS
    resize_masks: bool = False
    jobs: int = 0  # 0: every core
    glob: str | None = None
    overwrite: bool = False
    in_place: bool = False
    progress: bool = True
    weights: str | Path | None = None  # whose mask-shape statistics score the masks (default: the bundled model)
    max_ood_score: float | None = None  # None: that model's gate (1.0)
    input_root: str | Path | None = None  # where a manifest's images are now (default: where it recorded them)
    dicom: bool = False  # folder mode: also read extensionless / UID-named files as DICOM
    convention: str | None = None  # folder mode: what the masks outline (recorded; None: not known)
    chexmask: str | Path | None = None  # a CheXmask CSV: the masks of the images under `images`
    chexmask_id: str | None = None  # its image id column (None: found among chexmask.ID_COLUMNS)
    min_rca: float | None = None  # drop CheXmask rows whose Dice RCA (Mean) is under this

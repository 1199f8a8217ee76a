"""`lungkit variants`: lungs-only / lungs-removed images from existing masks, without a model.

- `options`: `VariantsOptions`, the manifest's columns;
- `sources`: where the image-mask pairs come from (a manifest, a masks-only dataset, CheXmask, two folders);
- `pair`: one pair through the lungs' finishing and the derive step (a joblib worker's unit);
- `run`: the job (`run_variants`): the run folder, the workers, the merged manifest.
"""

from lungmask_kit.variants.options import FIELDS, OUTPUT_FORMAT, VariantsOptions
from lungmask_kit.variants.run import run_variants
from lungmask_kit.variants.sources import SEGMENT_TRUST, pairs_from_folders

__all__ = ["FIELDS", "OUTPUT_FORMAT", "SEGMENT_TRUST", "VariantsOptions", "pairs_from_folders", "run_variants"]

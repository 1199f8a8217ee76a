#!/usr/bin/env bash
# Quickstart: segment the bundled example (with its QC page), derive cropped variants from the ground-truth
# masks, and score the predicted masks against them. Run from the repository root after `pip install -e .`.
set -euo pipefail
out=${1:-out/quickstart}
lungkit segment examples/cxr-sample/images -o "$out/segment" --report   # QC page: $out/segment/report/index.html
lungkit variants --images examples/cxr-sample/images --masks examples/cxr-sample/masks -o "$out/variants-gt" --crop --margin 16
lungkit evaluate "$out/segment/manifest.parquet" --truth examples/cxr-sample/masks -o "$out/evaluate"
python -c "import pandas as pd; print(pd.read_parquet('$out/segment/manifest.parquet')[['path','width','height','lung_area_fraction','n_components','qc_pass','status']].to_string())"

#!/usr/bin/env bash
# Quickstart: segment the bundled example (with its QC page), derive cropped variants from the ground-truth
# masks, and score the predicted masks against them. Run from the repository root after the README's first
# set-up command (the .venv it made is used whether or not it is active).
set -euo pipefail
[ -x .venv/bin/lungkit ] && PATH="$PWD/.venv/bin:$PATH"
out=${1:-out/quickstart}
lungkit segment examples/cxr-sample/images -o "$out/segment" --report   # QC page: $out/segment/report/index.html
lungkit variants --images examples/cxr-sample/images --masks examples/cxr-sample/masks -o "$out/variants-gt" --crop --margin 16
lungkit evaluate "$out/segment/manifest.parquet" --truth examples/cxr-sample/masks -o "$out/evaluate"
python - "$out/segment/manifest.parquet" <<'PY'
import sys

import pyarrow.parquet as pq

columns = ["path", "width", "height", "lung_area_fraction", "n_components", "qc_pass", "status"]
for row in pq.read_table(sys.argv[1], columns=columns).to_pylist():
    print("  ".join(f"{row[c]}" for c in columns))
PY

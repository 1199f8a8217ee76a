#!/usr/bin/env bash
# Segment cxr-seg and publish it twice: a full Parquet dataset (images, masks, lungs, nolungs) and a masks-only
# one (COCO RLE), each with a dataset card, croissant.json and SHA256SUMS; then rebuild the variants from the
# masks-only one and check the checksums. Run from the repository root after `pip install -e .`.
set -euo pipefail
data=${1:-../shared/data/cxr-seg}
out=${2:-runs/publish-cxr-seg}
mkdir -p "$(dirname "$out")"
python - "$data" "$out" <<'PY'
import sys, pandas as pd
pairs = pd.read_csv(f"{sys.argv[1]}/pairs.csv")
pd.DataFrame({"path": pairs.name + ".png", "patient_id": pairs.patient_id, "view": pairs.view,
              "finding": pairs.finding, "license": pairs.image_license}).to_csv(f"{sys.argv[2]}-labels.csv", index=False)
PY
lungkit segment "$data/images" -o "$out/segment" --labels "$out-labels.csv"
lungkit publish "$out/segment" -o "$out/full" --name cxr-seg-lungs
lungkit publish "$out/segment" -o "$out/masks-only" --name cxr-seg-lung-masks --masks-only
(cd "$out/full" && sha256sum -c --quiet SHA256SUMS) && (cd "$out/masks-only" && sha256sum -c --quiet SHA256SUMS)
lungkit variants "$out/masks-only" --input-root "$data/images" -o "$out/rebuilt"

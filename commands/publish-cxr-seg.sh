#!/usr/bin/env bash
# Segment cxr-seg and publish it twice: a full Parquet dataset (images, masks, lungs, nolungs) and a masks-only
# one (COCO RLE), each with a dataset card, croissant.json and SHA256SUMS; then rebuild the variants from the
# masks-only one and check the checksums. Run from the repository root after the README's first set-up command.
set -euo pipefail
[ -x .venv/bin/lungkit ] && PATH="$PWD/.venv/bin:$PATH"  # the README's set-up venv, active or not
data=${1:-../shared/data/cxr-seg}
out=${2:-runs/publish-cxr-seg}
mkdir -p "$(dirname "$out")"
python - "$data" "$out" <<'PY'
import csv, sys
with open(f"{sys.argv[1]}/pairs.csv", newline="") as src, open(f"{sys.argv[2]}-labels.csv", "w", newline="") as dst:
    out = csv.writer(dst)
    out.writerow(["path", "patient_id", "view", "finding", "license"])
    for r in csv.DictReader(src):
        out.writerow([r["name"] + ".png", r["patient_id"], r["view"], r["finding"], r["image_license"]])
PY
lungkit segment "$data/images" -o "$out/segment" --labels "$out-labels.csv"
lungkit publish "$out/segment" -o "$out/full" --name cxr-seg-lungs
lungkit publish "$out/segment" -o "$out/masks-only" --name cxr-seg-lung-masks --masks-only
(cd "$out/full" && sha256sum -c --quiet SHA256SUMS) && (cd "$out/masks-only" && sha256sum -c --quiet SHA256SUMS)
lungkit variants "$out/masks-only" --input-root "$data/images" -o "$out/rebuilt"

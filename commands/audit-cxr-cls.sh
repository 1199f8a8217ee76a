#!/usr/bin/env bash
# The shortcut audit on the shared labelled data: segment cxr-cls (labels, patients and sources from its
# labels.csv), look at the QC page, then train 3 seeds per variant with intervals, comparisons, Grad-CAM and
# source leakage. About 25 minutes on 2 CPU cores. Run from the repository root after the README's first set-up command.
set -euo pipefail
[ -x .venv/bin/lungkit ] && PATH="$PWD/.venv/bin:$PATH"  # the README's set-up venv, active or not
data=${1:-../shared/data/cxr-cls}
out=${2:-runs/audit-cxr-cls}
lungkit segment "$data" -o "$out/segment" --labels "$data/labels.csv" --report
lungkit classify "$out/segment/manifest.parquet" -o "$out/classify" --seeds 3 --image-size 128 --epochs 8
echo "results: $out/classify/results.md; QC page: $out/segment/report/index.html"

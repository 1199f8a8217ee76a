#!/usr/bin/env bash
# Reproduce the study on COVIDx CXR-3: segment every image with the bundled model, then train and compare
# COVID-19 classifiers on original / lungs-only / lungs-removed images, for dataset vs ImageNet
# normalisation and grayscale vs RGB input.
#
# Usage: commands/reproduce-covidx.sh COVIDX_DIR [OUT] [extra classify options...]
#   COVIDX_DIR holds train/, test/, train.txt and test.txt (COVIDx CXR-3 as distributed on Kaggle).
#   The split of train.txt / test.txt is used as is; lungkit refuses it if one patient is on both sides.
# Environment: ARCH (timm model, default resnet50), PRETRAINED=1 for ImageNet weights (needs the network),
#   IMAGE_SIZE (default 224), EPOCHS (default 10), DEVICE (default auto).
# A GPU is strongly advised: ~30k images x 3 variants x 4 configurations.
set -euo pipefail
[ -x .venv/bin/lungkit ] && PATH="$PWD/.venv/bin:$PATH"  # the README's set-up venv, active or not
covidx=${1:?usage: commands/reproduce-covidx.sh COVIDX_DIR [OUT]}
out=${2:-out/covidx}
shift $(( $# >= 2 ? 2 : 1 ))
arch=${ARCH:-resnet50}
pretrained=$([ "${PRETRAINED:-0}" = 1 ] && echo --pretrained || echo --no-pretrained)

lungkit segment "$covidx" -o "$out/segment" \
  --labels "$covidx/train.txt" --labels "$covidx/test.txt" \
  --batch-size 32 --device "${DEVICE:-auto}"

for normalize in dataset imagenet; do
  for channels in gray rgb; do
    lungkit classify "$out/segment/manifest.parquet" -o "$out/classify/$normalize-$channels" \
      --variant all --normalize "$normalize" --channels "$channels" --arch "$arch" "$pretrained" \
      --image-size "${IMAGE_SIZE:-224}" --epochs "${EPOCHS:-10}" --device "${DEVICE:-auto}" "$@"
  done
done

# one comparison table over the four configurations
python - "$out/classify" <<'PY'
import sys
from pathlib import Path
root = Path(sys.argv[1])
tables = [p.read_text().split("\n\n")[2] for p in sorted(root.glob("*/results.md"))]
rows = [t.splitlines() for t in tables]
print("\n".join(rows[0][:2] + [line for r in rows for line in r[2:]]))
PY

#!/usr/bin/env bash
# The GPU figures of issue 13 in one command (at most about 4 minutes on one GPU), from the repository root:
#
#   bash benchmarks/gpu_check.sh [path/to/segmentation_models_pytorch-*.whl]
#
# For PNG and JPEG inputs at native size (copies of the bundled ~2000 px example images) it prints model-only,
# I/O-only, end-to-end and naive-loop images/s, end-to-end against min(model, I/O) (goal >= 0.8) and against the
# naive loop (goal >= 10x), peak GPU memory, and for JPEG how far nvJPEG's pixels are from libjpeg's.
# Uses the project from source; installs segmentation-models-pytorch without dependencies if it is missing
# (GPU images often have torch, timm and OpenCV but not it). JSON results go to benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
if ! "$py" -c "import segmentation_models_pytorch" 2>/dev/null; then
  wheel=${1:-$(ls shared/wheels/segmentation_models_pytorch-*.whl wheels/segmentation_models_pytorch-*.whl 2>/dev/null | head -1 || true)}
  [ -n "$wheel" ] || { echo "gpu_check: segmentation_models_pytorch is missing; pass its wheel" >&2; exit 2; }
  "$py" -m pip install -q --no-deps "$wheel"
fi
"$py" -c "import torch, sys; torch.cuda.is_available() or sys.exit('gpu_check: no CUDA device')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
for fmt in png jpg; do
  echo "== $fmt, native size =="
  timeout 110 "$py" benchmarks/bench_segment.py --device cuda --format "$fmt" --n "${N:-192}" \
    --batch-size "${BATCH:-32}" --workers "${WORKERS:-12}" --skip-rss
done

#!/usr/bin/env bash
# Reproduce the bundled default segmenter from the shared real data (337 image + V7 lung-mask pairs).
# Usage: commands/train-default-model.sh [SHARED_DATA_DIR] [RUN_DIR]
# Takes about 1-2 hours on 2 CPU cores; a few minutes on one GPU.
set -euo pipefail
data=${1:-../shared/data/cxr-seg}
run=${2:-runs/default-model}
mkdir -p "$run"
# image,mask,patient_id CSV from pairs.csv so the validation split is by patient
python - "$data" "$run/pairs.csv" <<'PY'
import csv, os, sys
data, out = sys.argv[1], sys.argv[2]
rows = list(csv.DictReader(open(os.path.join(data, "pairs.csv"))))
with open(out, "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["image", "mask", "patient_id"])
    for r in rows:
        name = r["name"] + ".png"
        w.writerow([os.path.abspath(os.path.join(data, "images", name)), os.path.abspath(os.path.join(data, "masks", name)), r["patient_id"]])
PY
lungkit train "$run/pairs.csv" -o "$run" --arch FPN --encoder densenet121 --in-channels 1 \
  --encoder-weights none --epochs 36 --batch-size 8 --lr 1e-3 --val-fraction 0.2 --seed 0 \
  --name lungkit-fpn-densenet121-v7 "${@:3}"

# Validation at native resolution, after post-processing, on the patient-level validation split
python - "$run" <<'PY'
import json, os, sys
run = sys.argv[1]
split = json.load(open(os.path.join(run, "split.json")))
for kind in ("images", "masks"):
    os.makedirs(os.path.join(run, "val", kind), exist_ok=True)
for image in split["val"]:
    name = os.path.basename(image)
    mask = os.path.join(os.path.dirname(os.path.dirname(image)), "masks", name)
    for src, kind in ((image, "images"), (mask, "masks")):
        dst = os.path.join(run, "val", kind, name)
        if not os.path.lexists(dst):
            os.symlink(os.path.abspath(src), dst)
PY
# fp16 copy for shipping (about 19 MB); its input gate and est_dice refitted on the fp16 network it ships
# with (lungkit train fitted them for the fp32 best.safetensors), then segment + evaluate the validation
# patients with it
python -c "
import sys, torch
from lungmask_kit.models.modeling import load_model, save_model
model, cfg, _ = load_model('$run/best.safetensors')
save_model(model, cfg, '$run/export/model.safetensors', dtype=torch.float16)
"
lungkit calibrate "$run/pairs.csv" -w "$run/export" --val-fraction 0.2 --seed 0 -q
lungkit segment "$run/val/images" -o "$run/val-segment" -w "$run/export" --overwrite -q
lungkit evaluate "$run/val-segment/manifest.parquet" --truth "$run/val/masks" -o "$run/val-evaluate"
echo "To ship: cp $run/export/model.safetensors $run/export/config.json lungmask_kit/models/default/"

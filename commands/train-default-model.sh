#!/usr/bin/env bash
# Reproduce the bundled default segmenter from the shared real data: one network with an output per annotation
# convention, v7 (cxr-seg: 337 image + V7 lung-mask pairs, lung behind the heart included) and jsrt
# (cxr-seg-jsrt: 274 pairs, visible lung fields only). Each image is supervised only on its own convention's
# output; the shared encoder sees both collections.
# Usage: commands/train-default-model.sh [SHARED_DATA_DIR] [RUN_DIR] [extra lungkit train options]
# Stage 1 (the v7-only parent, from scratch): about 1-2 hours on 2 CPU cores. Stage 2 (both conventions,
# fine-tuned from the parent): about 30 minutes on 2 CPU cores with bf16 (AVX512-BF16); minutes on one GPU.
# Set PARENT=default to fine-tune from the bundled model instead of training stage 1.
set -euo pipefail
[ -x .venv/bin/lungkit ] && PATH="$PWD/.venv/bin:$PATH"  # the README's set-up venv, active or not
data=${1:-../shared/data}
run=${2:-runs/default-model}
mkdir -p "$run"
# image,mask,patient_id CSVs so that each collection's validation split is by patient (cxr-seg-jsrt has no
# patient ids: each image is its own patient)
python - "$data" "$run" <<'PY'
import csv, os, sys
data, run = sys.argv[1], sys.argv[2]
def write(name, rows):
    with open(os.path.join(run, name), "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "mask", "patient_id"])
        w.writerows(rows)
seg = os.path.join(data, "cxr-seg")
write("cxr-seg.csv", [[os.path.abspath(os.path.join(seg, kind, r["name"] + ".png")) for kind in ("images", "masks")]
                      + [r["patient_id"]] for r in csv.DictReader(open(os.path.join(seg, "pairs.csv")))])
jsrt = os.path.join(data, "cxr-seg-jsrt")
write("cxr-seg-jsrt.csv", [[os.path.abspath(os.path.join(jsrt, r["image"])), os.path.abspath(os.path.join(jsrt, r["mask"])),
                            "jsrt:" + r["name"]] for r in csv.DictReader(open(os.path.join(jsrt, "pairs.csv")))])
PY
parent=${PARENT:-}
if [ -z "$parent" ]; then
  # stage 1: the v7 network from scratch (the bundled model before conventions: lungkit-fpn-densenet121-v7)
  lungkit train "$run/cxr-seg.csv" -o "$run/v7" --convention v7 --arch FPN --encoder densenet121 --in-channels 1 \
    --encoder-weights none --epochs 36 --batch-size 8 --lr 1e-3 --val-fraction 0.2 --seed 0 \
    --name lungkit-fpn-densenet121-v7
  parent="$run/v7/best.safetensors"
fi
# stage 2: both conventions, fine-tuned from the parent. The same seed and --val-fraction give cxr-seg the same
# validation patients as stage 1 (each data argument is split alone), so they stay unseen.
lungkit train "$run/cxr-seg.csv" "$run/cxr-seg-jsrt.csv" --convention v7 --convention jsrt --init "$parent" \
  -o "$run/both" --epochs 20 --batch-size 8 --lr 3e-4 --val-fraction 0.2 --seed 0 \
  --name lungkit-fpn-densenet121-v7-jsrt "${@:3}"

# validation images of each convention, for the native-size check after post-processing
python - "$run" <<'PY'
import csv, json, os, sys
run = sys.argv[1]
val = set(json.load(open(os.path.join(run, "both", "split.json")))["val"])
for name in ("cxr-seg", "cxr-seg-jsrt"):
    for kind in ("images", "masks"):
        os.makedirs(os.path.join(run, "val", name, kind), exist_ok=True)
    for r in csv.DictReader(open(os.path.join(run, name + ".csv"))):
        if r["image"] not in val:
            continue
        stem = os.path.splitext(os.path.basename(r["image"]))[0]
        for src, kind in ((r["image"], "images"), (r["mask"], "masks")):
            dst = os.path.join(run, "val", name, kind, stem + os.path.splitext(src)[1])
            if not os.path.lexists(dst):
                os.symlink(os.path.abspath(src), dst)
PY
# fp16 copy for shipping (about 19 MB); its input gate and est_dice refitted on the fp16 network it ships
# with (lungkit train fitted them for the fp32 best.safetensors), then segment + evaluate each convention's
# validation images with it
python -c "
import torch
from lungmask_kit.models.modeling import load_model, save_model
model, cfg, _ = load_model('$run/both/best.safetensors')
save_model(model, cfg, '$run/export/model.safetensors', dtype=torch.float16)
"
lungkit calibrate "$run/cxr-seg.csv" "$run/cxr-seg-jsrt.csv" --convention v7 --convention jsrt -w "$run/export" \
  --val-fraction 0.2 --seed 0 -q
for pair in "cxr-seg v7" "cxr-seg-jsrt jsrt"; do
  set -- $pair
  lungkit segment "$run/val/$1/images" -o "$run/val-segment-$2" -w "$run/export" --convention "$2" --overwrite -q
  lungkit evaluate "$run/val-segment-$2/manifest.parquet" --truth "$run/val/$1/masks" --convention "$2" \
    -o "$run/val-evaluate-$2"
done
echo "To ship: cp $run/export/model.safetensors $run/export/config.json lungmask_kit/models/default/"

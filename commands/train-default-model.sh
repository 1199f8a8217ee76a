#!/usr/bin/env bash
# Reproduce the bundled default segmenter from the shared real data: one network with an output per annotation
# convention, v7 (cxr-seg: 337 image + V7 lung-mask pairs, lung behind the heart included) and jsrt
# (cxr-seg-jsrt: 274 pairs, visible lung fields only; cxr-heart: 259 more), and a heart output (cxr-heart's
# heart masks). Each image is supervised only on the outputs it has masks for; the shared encoder sees all
# three collections.
# Usage: commands/train-default-model.sh [SHARED_DATA_DIR] [RUN_DIR] [extra lungkit train options]
# Stage 1 (the v7-only parent, from scratch): about 1-2 hours on 2 CPU cores. Stage 2 (both conventions,
# fine-tuned from the parent): about 30 minutes on 2 CPU cores with bf16 (AVX512-BF16); minutes on one GPU.
# Stage 3 (the heart output, fine-tuned from stage 2 on all three collections): about 20-25 minutes on 2 CPU cores
# with AMX bf16.
# Set PARENT=default to fine-tune stage 2 from the bundled model instead of training stage 1; HEART_PARENT=WEIGHTS
# (or default) to run stage 3 alone from those weights. The bundled model is stage 3 from the previous bundled
# model, lungkit-fpn-densenet121-v7-jsrt (sha256 2570e8b8..., `git show e46a932:lungmask_kit/models/default/...`).
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
# cxr-heart: right + left lung masks joined into one visible-lung mask per image; no patient ids either. One
# image's published heart and left-lung masks are swapped (its "heart" lies 100 px above its "left lung"): the
# two are swapped back here (rule: a heart whose centre is above the left lung's), written beside the lungs.
import cv2
import numpy as np
heart = os.path.join(data, "cxr-heart")
lungs, hearts = os.path.join(run, "cxr-heart-lungs"), os.path.join(run, "cxr-heart-fixed")
os.makedirs(lungs, exist_ok=True)
rows = []
for r in csv.DictReader(open(os.path.join(heart, "pairs.csv"))):
    right, left, h = (cv2.imread(os.path.join(heart, "masks", kind, r["name"]), cv2.IMREAD_GRAYSCALE) > 127
                      for kind in ("right_lung", "left_lung", "heart"))
    heart_path = os.path.abspath(os.path.join(heart, "masks", "heart", r["name"]))
    if np.nonzero(h)[0].mean() < np.nonzero(left)[0].mean() - 50:  # swapped by the publisher
        left, h = h, left
        os.makedirs(hearts, exist_ok=True)
        heart_path = os.path.abspath(os.path.join(hearts, r["name"]))
        cv2.imwrite(heart_path, h.astype("uint8") * 255)
        print(f"cxr-heart {r['name']}: heart and left lung masks swapped back")
    union = os.path.abspath(os.path.join(lungs, r["name"]))
    cv2.imwrite(union, (right | left).astype("uint8") * 255)
    rows.append([os.path.abspath(os.path.join(heart, "images", r["name"])), union, heart_path, "heart:" + r["name"]])
with open(os.path.join(run, "cxr-heart.csv"), "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["image", "mask", "heart", "patient_id"])
    w.writerows(rows)
PY
parent=${PARENT:-}
heart_parent=${HEART_PARENT:-}
if [ -z "$parent" ] && [ -z "$heart_parent" ]; then
  # stage 1: the v7 network from scratch (the bundled model before conventions: lungkit-fpn-densenet121-v7)
  lungkit train "$run/cxr-seg.csv" -o "$run/v7" --convention v7 --arch FPN --encoder densenet121 --in-channels 1 \
    --encoder-weights none --epochs 36 --batch-size 8 --lr 1e-3 --val-fraction 0.2 --seed 0 \
    --name lungkit-fpn-densenet121-v7
  parent="$run/v7/best.safetensors"
fi
# stage 2: both conventions, fine-tuned from the parent. The same seed and --val-fraction give cxr-seg the same
# validation patients as stage 1 (each data argument is split alone), so they stay unseen.
if [ -z "$heart_parent" ]; then
  lungkit train "$run/cxr-seg.csv" "$run/cxr-seg-jsrt.csv" --convention v7 --convention jsrt --init "$parent" \
    -o "$run/both" --epochs 20 --batch-size 8 --lr 3e-4 --val-fraction 0.2 --seed 0 \
    --name lungkit-fpn-densenet121-v7-jsrt "${@:3}"
  heart_parent="$run/both/best.safetensors"
fi
# stage 3: a heart output beside both lung conventions, supervised only by cxr-heart's heart masks (its lung masks
# train the jsrt output); cxr-seg and cxr-seg-jsrt keep their validation images (split alone, same seed)
lungkit train "$run/cxr-seg.csv" "$run/cxr-seg-jsrt.csv" "$run/cxr-heart.csv" --convention v7 --convention jsrt \
  --convention jsrt --init "$heart_parent" -o "$run/heart" --epochs 14 --batch-size 8 --lr 2e-4 --val-fraction 0.2 \
  --seed 0 --name lungkit-fpn-densenet121-v7-jsrt-heart "${@:3}"

# validation images of each convention, for the native-size check after post-processing
python - "$run" <<'PY'
import csv, json, os, sys
run = sys.argv[1]
val = set(json.load(open(os.path.join(run, "heart", "split.json")))["val"])
for name in ("cxr-seg", "cxr-seg-jsrt", "cxr-heart"):
    for kind in ("images", "masks", "heart"):
        os.makedirs(os.path.join(run, "val", name, kind), exist_ok=True)
    for r in csv.DictReader(open(os.path.join(run, name + ".csv"))):
        if r["image"] not in val:
            continue
        stem = os.path.splitext(os.path.basename(r["image"]))[0]
        for src, kind in ((r["image"], "images"), (r["mask"], "masks"), (r.get("heart"), "heart")):
            if not src:
                continue
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
model, cfg, _ = load_model('$run/heart/best.safetensors')
save_model(model, cfg, '$run/export/model.safetensors', dtype=torch.float16)
"
# the view gate's other images: cxr-ood's lateral radiographs and CT slices, by kind (the installed packages'
# sample pictures join them)
python - "$data" "$run" <<'PY'
import csv, os, sys
data, run = sys.argv[1], sys.argv[2]
for r in csv.DictReader(open(os.path.join(data, "cxr-ood", "list.csv"))):
    kind = "lateral" if r["view"] == "L" else "cross-sectional" if r["modality"] in ("CT", "MR") else "other"
    os.makedirs(os.path.join(run, "negatives", kind), exist_ok=True)
    dst = os.path.join(run, "negatives", kind, r["name"])
    if not os.path.lexists(dst):
        os.symlink(os.path.abspath(os.path.join(data, "cxr-ood", "images", r["name"])), dst)
PY
lungkit calibrate "$run/cxr-seg.csv" "$run/cxr-seg-jsrt.csv" "$run/cxr-heart.csv" --convention v7 --convention jsrt \
  --convention jsrt -w "$run/export" --val-fraction 0.2 --seed 0 --negatives "$run/negatives" -q
for pair in "cxr-seg v7" "cxr-seg-jsrt jsrt"; do
  set -- $pair
  lungkit segment "$run/val/$1/images" -o "$run/val-segment-$2" -w "$run/export" --convention "$2" --overwrite -q
  lungkit evaluate "$run/val-segment-$2/manifest.parquet" --truth "$run/val/$1/masks" --convention "$2" \
    -o "$run/val-evaluate-$2"
done
# the heart and the CTR on cxr-heart's validation images (jsrt lungs; CTR against the publisher's)
lungkit segment "$run/val/cxr-heart/images" -o "$run/val-segment-heart" -w "$run/export" --convention jsrt --overwrite -q
lungkit evaluate "$run/val-segment-heart/manifest.parquet" --truth "$run/val/cxr-heart/masks" --convention jsrt \
  --truth-heart "$run/val/cxr-heart/heart" --truth-ctr "$data/cxr-heart/pairs.csv" --ctr-column ctr_ground_truth \
  -o "$run/val-evaluate-heart"
echo "To ship: cp $run/export/model.safetensors $run/export/config.json lungmask_kit/models/default/"

"""The heart output and the cardiothoracic ratio: finishing, the CTR formula, QC, training a heart channel, and every
output that carries lungs carrying the heart (manifest, report, publish, CheXmask, DICOM-SEG, evaluate)."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lungmask_kit import rle
from lungmask_kit.anatomy.heart import (
    cardiothoracic_ratio,
    fill_holes,
    finish_heart,
    heart_fields,
    thorax_fields,
    widest_extent,
)
from lungmask_kit.postprocess import lung_sides
from lungmask_kit.qc import QCThresholds, qc_update

from conftest import cxr_like, shared, write_png


def _chest(h: int = 200, w: int = 240) -> tuple[np.ndarray, np.ndarray]:
    """(lungs, heart): two lung rectangles spanning columns 20..219 (200 px), a heart spanning 90..169 (80 px)."""
    lungs = np.zeros((h, w), bool)
    lungs[30:170, 20:100] = True
    lungs[30:170, 140:220] = True
    heart = np.zeros((h, w), bool)
    heart[100:160, 90:170] = True
    return lungs, heart


def test_ctr_is_the_widest_heart_over_the_widest_thorax():
    lungs, heart = _chest()
    fields = {**heart_fields(heart), **thorax_fields(lungs, lung_sides(lungs))}
    assert fields["heart_width_px"] == 80 and fields["thorax_width_px"] == 200
    assert cardiothoracic_ratio(fields["heart_width_px"], fields["thorax_width_px"]) == 0.4
    assert fields["ctr_null_reason"] is None
    assert fields["heart_fraction"] == round(60 * 80 / (200 * 240), 6) and fields["heart_mm2"] is None
    assert np.array_equal(rle.decode(fields["heart_rle"]), heart)
    # a tilted heart: its widest extent is over all rows, not one row's run
    tilted = np.zeros_like(heart)
    for k, row in enumerate(range(100, 160)):
        tilted[row, 90 + k: 110 + k] = True
    assert widest_extent(tilted) == 20 + 59


def test_heart_area_in_mm2_from_the_pixel_spacing():
    _, heart = _chest()
    assert heart_fields(heart, [0.2, 0.1])["heart_mm2"] == round(60 * 80 * 0.02, 2)


def test_no_ctr_over_one_lung_or_without_a_visible_lung_mask():
    lungs, _ = _chest()
    one = lungs.copy()
    one[:, 120:] = False
    fields = thorax_fields(one, lung_sides(one))
    assert fields["thorax_width_px"] is None and "a lung is missing" in fields["ctr_null_reason"]
    assert thorax_fields(None, None)["thorax_width_px"] is None
    assert cardiothoracic_ratio(None, 200) is None and cardiothoracic_ratio(80, None) is None


def test_finish_heart_keeps_one_solid_component():
    probability = np.zeros((64, 64), np.float32)
    probability[20:50, 20:50] = 0.9
    probability[30:35, 30:35] = 0.1  # a hole
    probability[2:6, 2:6] = 0.9  # a speck elsewhere
    heart = finish_heart(probability, 0.5)
    assert heart[30:35, 30:35].all() and not heart[2:6, 2:6].any()
    assert heart.sum() == 30 * 30
    ring = np.zeros((9, 9), bool)
    ring[1:8, 1:8] = True
    ring[3:6, 3:6] = False
    assert fill_holes(ring)[4, 4] and not fill_holes(ring)[0, 0]
    assert not finish_heart(np.zeros((8, 8), np.float32), 0.5).any()


def _manifest(rows: list[dict]) -> pa.Table:
    from lungmask_kit.manifest import SEGMENT_FIELDS, to_table

    base = {"status": "ok", "lung_area_fraction": 0.3}
    return to_table([{**base, "path": f"{i}.png", **r} for i, r in enumerate(rows)], SEGMENT_FIELDS)


def test_qc_reports_the_ctr_and_nulls_it_where_the_image_may_not_be_frontal():
    table = _manifest([
        {"heart_width_px": 80, "thorax_width_px": 200},
        {"heart_width_px": 120, "thorax_width_px": 200, "ood_image_score": 1.4},
        {"heart_width_px": 80, "thorax_width_px": None, "ctr_null_reason": "a lung is missing from the visible-lung mask"},
        {"heart_width_px": 80, "thorax_width_px": 200, "view": "LL"},
        {},  # a model without a heart: no CTR and no reason
    ])
    rows = qc_update(QCThresholds(max_ood_score=1.0))(table).to_pylist()
    assert [r["ctr"] for r in rows] == [0.4, None, None, None, None]
    assert rows[0]["ctr_null_reason"] is None and rows[4]["ctr_null_reason"] is None
    assert "not a frontal" in rows[1]["ctr_null_reason"] and "lateral" in rows[3]["ctr_null_reason"]
    assert rows[2]["ctr_null_reason"].startswith("a lung is missing")
    # a looser gate (re-flagging without re-segmenting) gives the second image its CTR back
    again = qc_update(QCThresholds(max_ood_score=1.5))(qc_update(QCThresholds(max_ood_score=1.0))(table)).to_pylist()
    assert again[1]["ctr"] == 0.6 and again[1]["ctr_null_reason"] is None and again[1]["qc_pass"]


def test_flag_ctr_above_is_a_qc_reason_of_its_own():
    from lungmask_kit.qc import reason_counts

    table = _manifest([{"heart_width_px": 80, "thorax_width_px": 200}, {"heart_width_px": 120, "thorax_width_px": 200}])
    rows = qc_update(QCThresholds(flag_ctr_above=0.5))(table).to_pylist()
    assert rows[0]["qc_pass"] and not rows[1]["qc_pass"]
    assert rows[1]["qc_reason"] == "cardiothoracic ratio 0.600 > flag_ctr_above 0.5"
    assert reason_counts([rows[1]["qc_reason"]]) == {"CTR above flag_ctr_above": 1}
    assert all(r["qc_pass"] for r in qc_update(QCThresholds())(table).to_pylist())  # off by default


def test_config_counts_the_heart_channel_after_the_conventions():
    from lungmask_kit.models import ModelConfig

    cfg = ModelConfig(classes=3, conventions=["v7", "jsrt"], structures=["heart"])
    assert cfg.problem() is None and cfg.outputs == ["v7", "jsrt", "heart"] and cfg.structure_index("heart") == 2
    assert ModelConfig(classes=2, conventions=["v7", "jsrt"]).structure_index("heart") is None
    assert "conventions must list" in ModelConfig(classes=2, conventions=["v7", "jsrt"], structures=["heart"]).problem()
    assert "structures must list" in ModelConfig(classes=2, conventions=["v7"], structures=["liver"]).problem()


def _heart_pairs(root, n: int, seed: int):
    """Synthetic CXRs with jsrt lung masks (the dark fields) and a heart (a bright block between them)."""
    rows = []
    for i in range(n):
        img = cxr_like(96, 96, seed=seed + i)
        heart = np.zeros(img.shape, bool)
        heart[55:85, 38:62] = True
        img[heart] = 235
        lungs = (img < 110) & ~heart
        for kind, pixels in (("images", img), ("masks", lungs.astype(np.uint8) * 255),
                             ("heart", heart.astype(np.uint8) * 255)):
            write_png(root / kind / f"h{i}.png", pixels)
        rows.append(f"h{i}.png")
    return root


def test_train_a_heart_channel_then_segment_writes_heart_masks_and_ctr(tmp_path):
    from lungmask_kit.cli.app import main
    from lungmask_kit.segment import SegmentOptions, run_segment
    from lungmask_kit.training.data import PairDataset, find_pairs

    data = _heart_pairs(tmp_path / "data", 10, 0)
    pairs = find_pairs(data, "jsrt")
    assert all(p.heart is not None and p.heart.name == p.image.name for p in pairs)
    ds = PairDataset(pairs[:2], 64, 1, lambda *a: a, ["v7", "jsrt", "heart"])
    assert (ds.targets[:, 0] == -1).all() and set(ds.targets[:, 1:].unique().tolist()) == {0.0, 1.0}
    run = tmp_path / "run"
    assert main(["train", str(data), "--convention", "jsrt", "-o", str(run), "--encoder", "resnet18", "--epochs", "2",
                 "--batch-size", "4", "--val-fraction", "0.2", "--device", "cpu", "-q"]) == 0
    config = json.loads((run / "best.json").read_text())
    assert config["conventions"] == ["jsrt"] and config["structures"] == ["heart"] and config["classes"] == 2
    assert config["provenance"]["images_per_convention"]["heart"] == {"train": 8, "val": 2}
    assert "val_dice_heart" in json.loads((run / "log.json").read_text())[0]
    out = tmp_path / "seg"
    s = run_segment(data / "images", out, SegmentOptions(weights=run / "best.safetensors", convention="jsrt", progress=False))
    assert s.ok == 10 and str(out / "heart") in s.output_folders
    for r in pq.read_table(out / "manifest.parquet").to_pylist():
        heart = read_mask(out / r["heart_path"])
        assert np.array_equal(heart, rle.decode(r["heart_rle"]))
        assert r["heart_fraction"] == round(heart.mean(), 6)
        # a CTR from the widths, or the reason there is none
        assert (r["ctr"] is not None) != (r["ctr_null_reason"] is not None)
        if r["ctr"] is not None:
            assert r["ctr"] == round(r["heart_width_px"] / r["thorax_width_px"], 4)
    # resumed: nothing redone, the heart masks are part of what a finished image has
    assert run_segment(data / "images", out, SegmentOptions(weights=run / "best.safetensors", convention="jsrt",
                                                             progress=False)).skipped == 10


def read_mask(path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0


def test_initialise_from_gives_a_new_heart_channel_the_first_output(tmp_path):
    from lungmask_kit.models import ModelConfig, build_model, save_model
    from lungmask_kit.models.modeling import initialise_from, load_bundle

    torch.manual_seed(0)
    parent_cfg = ModelConfig(name="p", encoder="resnet18", input_size=64, classes=2, conventions=["v7", "jsrt"])
    parent = load_bundle(save_model(build_model(parent_cfg), parent_cfg, tmp_path / "p" / "model.safetensors").parent)
    cfg = ModelConfig(encoder="resnet18", input_size=64, classes=3, conventions=["v7", "jsrt"], structures=["heart"])
    child = build_model(cfg)
    initialise_from(child, cfg, parent)
    p, c = parent.model.state_dict(), child.state_dict()
    for key in ("segmentation_head.0.weight", "segmentation_head.0.bias"):
        assert torch.equal(c[key][:2], p[key]) and torch.equal(c[key][2], p[key][0])


def test_a_qc_reason_never_shows_a_value_equal_to_its_limit():
    from lungmask_kit.qc import qc_reasons

    reasons = qc_reasons({"lung_area_fraction": 0.3, "ood_image_score": 1.0004, "est_dice": 0.91498,
                          "ctr": 0.50001}, QCThresholds(max_ood_score=1.0, min_est_dice=0.915, flag_ctr_above=0.5))
    assert "image ood score 1.0004 > max_ood_score 1" in reasons[0]
    assert "low estimated Dice 0.91498 < min_est_dice 0.915" in reasons[1]
    assert "cardiothoracic ratio 0.50001 > flag_ctr_above 0.5" in reasons[2]
    assert "image ood score 1.40 >" in qc_reasons({"ood_image_score": 1.4}, QCThresholds(max_ood_score=1.0))[0]

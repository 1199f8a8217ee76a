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


def test_a_heart_inside_one_lung_field_gives_no_ctr():
    from lungmask_kit.anatomy.heart import crosses_midline

    lungs, heart = _chest()
    sides = lung_sides(lungs)
    assert crosses_midline(heart, sides) and thorax_fields(lungs, sides, heart)["ctr_null_reason"] is None
    inside = np.zeros_like(heart)
    inside[100:160, 125:200] = True  # from the left lung's medial edge outwards: 0 of its area right of the midline
    fields = thorax_fields(lungs, sides, inside)
    assert not crosses_midline(inside, sides) and fields["ctr_null_reason"].startswith("implausible heart")
    assert fields["thorax_width_px"] == 200  # measured, but no CTR: QC keeps the reason whatever the thresholds
    table = _manifest([{"heart_width_px": 75, **fields}])
    row = qc_update(QCThresholds(max_ood_score=5.0))(table).to_pylist()[0]
    assert row["ctr"] is None and row["ctr_null_reason"].startswith("implausible heart")


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
    opts = SegmentOptions(weights=run / "best.safetensors", convention="jsrt", heart_png=True, progress=False)
    s = run_segment(data / "images", out, opts)
    assert s.ok == 10 and str(out / "heart") in s.output_folders
    for r in pq.read_table(out / "manifest.parquet").to_pylist():
        heart = read_mask(out / r["heart_path"])
        assert np.array_equal(heart, rle.decode(r["heart_rle"]))
        assert r["heart_fraction"] == round(heart.mean(), 6)
        # a CTR from the widths, or the reason there is none
        assert (r["ctr"] is not None) != (r["ctr_null_reason"] is not None)
        if r["ctr"] is not None:
            assert r["ctr"] == round(r["heart_width_px"] / r["thorax_width_px"], 4)
    # resumed: nothing redone, the heart PNGs are part of what a finished image has
    assert run_segment(data / "images", out, opts).skipped == 10
    (out / pq.read_table(out / "manifest.parquet").column("heart_path")[0].as_py()).unlink()
    assert run_segment(data / "images", out, opts).processed == 1  # a lost heart PNG is redone


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


@pytest.fixture(scope="module")
def heart_run(tmp_path_factory, example_images):
    """The bundled model (it draws the heart) on three real examples."""
    import shutil

    from lungmask_kit.segment import SegmentOptions, run_segment

    root = tmp_path_factory.mktemp("heart")
    src = root / "in"
    src.mkdir()
    for name in ("ieee_41182_2020_203_Fig3_HTML.png", "ieee_b39f5cf9.png", "ieee_2cd63b76.png"):
        shutil.copy(example_images / name, src / name)
    assert run_segment(src, root / "out", SegmentOptions(progress=False)).ok == 3
    return root / "out"


def test_the_bundled_model_draws_the_heart_and_measures_the_ctr_on_visible_lungs(heart_run):
    from lungmask_kit.models.modeling import load_config

    config, _ = load_config()
    assert config.structures == ["heart"] and config.outputs == ["v7", "jsrt", "heart"]
    rows = pq.read_table(heart_run / "manifest.parquet").to_pylist()
    for r in rows:
        assert r["convention"] == "v7" and 0.03 < r["heart_fraction"] < 0.3
        assert r["heart_path"] is None and r["heart_rle"]  # no PNG unless --heart-png: the RLE holds the mask
        # the thorax is measured on the jsrt output, not on the v7 lungs the run wrote
        v7_width = widest_extent(rle.decode(r["right_lung_rle"]) | rle.decode(r["left_lung_rle"]))
        assert r["thorax_width_px"] is not None and r["thorax_width_px"] <= v7_width
    assert sum(r["ctr"] is not None for r in rows) >= 2 and all(0.3 < r["ctr"] < 0.8 for r in rows if r["ctr"])


def test_publish_carries_the_heart_in_both_modes_and_in_chexmask_csv(heart_run, tmp_path):
    from lungmask_kit.cli.app import main

    # chexmask.csv's readers take masks as visible lungs: a v7 run is refused, a jsrt run of the same images taken
    assert main(["publish", str(heart_run), "-o", str(tmp_path / "refused"), "--chexmask", "-q"]) == 2
    assert not (tmp_path / "refused").exists()
    jsrt_run = tmp_path / "jsrt"
    assert main(["segment", str(heart_run.parent / "in"), "-o", str(jsrt_run), "--convention", "jsrt", "-q"]) == 0
    heart_run = jsrt_run
    full, masks = tmp_path / "full", tmp_path / "masks"
    assert main(["publish", str(heart_run), "-o", str(full), "--include-flagged", "--chexmask", "-q"]) == 0
    assert main(["publish", str(heart_run), "-o", str(masks), "--masks-only", "--include-flagged", "-q"]) == 0
    manifest = {r["path"]: r for r in pq.read_table(heart_run / "manifest.parquet").to_pylist()}
    shard = pq.read_table(next((full / "data").glob("*.parquet")))
    assert "heart" in shard.column_names and "heart_path" not in shard.column_names
    features = json.loads(shard.schema.metadata[b"huggingface"])["info"]["features"]
    assert features["heart"] == {"_type": "Image"}
    for r in shard.to_pylist():
        png = cv2.imdecode(np.frombuffer(r["heart"]["bytes"], np.uint8), cv2.IMREAD_GRAYSCALE) > 0
        assert np.array_equal(png, rle.decode(manifest[r["path"]]["heart_rle"]))
        assert r["ctr"] == manifest[r["path"]]["ctr"]
    rows = pq.read_table(next((masks / "data").glob("*.parquet"))).to_pylist()
    assert all(np.array_equal(rle.decode(r["heart_rle"]), rle.decode(manifest[r["path"]]["heart_rle"])) for r in rows)
    from lungmask_kit import chexmask

    with open(full / "chexmask.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            heart = chexmask.decode(r["Heart"], int(r["Height"]), int(r["Width"]))
            assert np.array_equal(heart, rle.decode(manifest[r["Path"]]["heart_rle"]))
    card = (full / "README.md").read_text()
    assert "cardiothoracic ratio" in card and "`heart` as PNG" in card
    croissant = json.loads((full / "croissant.json").read_text())
    fields = {f["name"] for rs in croissant["recordSet"] for f in rs["field"]}
    assert {"heart", "heart_rle", "ctr"} <= fields


def test_evaluate_scores_the_heart_and_the_ctr(heart_run, tmp_path):
    from lungmask_kit.evaluate import evaluate_masks

    rows = pq.read_table(heart_run / "manifest.parquet").to_pylist()
    truth = tmp_path / "hearts"
    truth.mkdir()
    ratios = tmp_path / "ctr.csv"
    with open(ratios, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["name", "ctr_ground_truth"])
        for k, r in enumerate(rows):
            heart = rle.decode(r["heart_rle"])
            if k == 0:
                heart = np.roll(heart, 10, axis=1)  # a truth 10 px aside: Dice below 1
            write_png(truth / r["path"], heart.astype(np.uint8) * 255)
            w.writerow([r["path"], "" if r["ctr"] is None else r["ctr"] + 0.02])
    s = evaluate_masks(heart_run, None, tmp_path / "ev", progress=False, truth_heart=truth, truth_ctr=ratios,
                       ctr_column="ctr_ground_truth")
    assert s["n"] == 3 and s["n_error"] == 0 and s["dice"] is None
    assert s["heart_dice"]["max"] == 1.0 and s["heart_dice"]["min"] < 1.0
    assert s["ctr_abs_error"]["mean"] == pytest.approx(0.02, abs=1e-9)
    metrics = pq.read_table(tmp_path / "ev" / "metrics.parquet").to_pylist()
    assert all(m["heart_dice"] is not None for m in metrics)


def test_report_draws_the_heart_and_prints_the_ctr(heart_run, tmp_path):
    from lungmask_kit.report import ReportOptions, build_report
    from lungmask_kit.report.overlay import HEART_TINT_BGR, overlay

    image = np.full((100, 120), 128, np.uint8)
    lungs, heart = np.zeros((100, 120), bool), np.zeros((100, 120), bool)
    lungs[10:90, 10:50] = True
    heart[40:80, 50:90] = True
    plain, with_heart = overlay(image, lungs, 120), overlay(image, lungs, 120, heart=heart)
    inside = with_heart[60, 70].astype(float)
    assert np.array_equal(plain[60, 70], [128, 128, 128]) and inside[0] > inside[1]  # tinted magenta
    assert np.allclose(inside, 0.72 * 128 + 0.28 * HEART_TINT_BGR, atol=1)
    build_report(heart_run, tmp_path / "rep", ReportOptions(progress=False, sample=10))
    assert "CTR 0." in "".join(p.read_text() for p in (tmp_path / "rep").glob("*.html"))


def test_heart_and_ctr_on_cxr_heart_validation_images(tmp_path):
    """Real data: cxr-heart images the bundled model never trained on (its recipe's split: by image, seed 0)."""
    from lungmask_kit.evaluate import evaluate_masks
    from lungmask_kit.segment import SegmentOptions, run_segment
    from lungmask_kit.training.data import Pair, split_pairs

    data = shared("cxr-heart")
    with open(data / "pairs.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    pairs = [Pair(data / "images" / r["name"], data / "masks" / "heart" / r["name"], "heart:" + r["name"]) for r in rows]
    _, val, _ = split_pairs(pairs, 0.2, 0)
    chosen = sorted(p.image.name for p in val)[:12]
    images = tmp_path / "images"
    images.mkdir()
    for name in chosen:
        (images / name).symlink_to(data / "images" / name)
    assert run_segment(images, tmp_path / "out", SegmentOptions(convention="jsrt", progress=False)).ok == len(chosen)
    s = evaluate_masks(tmp_path / "out", None, tmp_path / "ev", progress=False, truth_heart=data / "masks" / "heart",
                       truth_ctr=data / "pairs.csv", ctr_column="ctr_ground_truth")
    # the recipe's full validation set: heart Dice 0.929 mean, CTR error 0.013 mean
    assert s["heart_dice"]["n"] == len(chosen) and s["heart_dice"]["median"] > 0.90
    assert s["ctr_abs_error"]["n"] >= 6 and s["ctr_abs_error"]["mean"] < 0.03

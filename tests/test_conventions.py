"""Annotation conventions (v7 / jsrt) and the right and left lungs: post-processing, manifests, training,
calibration, evaluation."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lungmask_kit import rle
from lungmask_kit.derive import lung_fields
from lungmask_kit.imaging import read_gray
from lungmask_kit.postprocess import LEFT_LUNG, RIGHT_LUNG, lung_sides, right_lung_region, split_by_region

from conftest import cxr_like, write_dicom, write_png


def _ellipse(mask: np.ndarray, cx: float, cy: float, rx: float, ry: float, angle: float = 0.0) -> np.ndarray:
    out = mask.copy().astype(np.uint8)
    cv2.ellipse(out, (round(cx), round(cy)), (round(rx), round(ry)), angle, 0, 360, 1, -1)
    return out.astype(bool)


def _two_lungs(size: int = 256, gap: int = 30) -> np.ndarray:
    """A right lung (image left) a little smaller than the left one, `gap` px of mediastinum between them."""
    m = np.zeros((size, size), bool)
    m = _ellipse(m, size / 2 - gap / 2 - 40, 120, 40, 85)
    return _ellipse(m, size / 2 + gap / 2 + 44, 125, 44, 90)


def test_two_separate_lungs_split_by_side_of_the_image():
    mask = _two_lungs()
    labels = lung_sides(mask)
    assert np.array_equal(labels > 0, mask)  # every mask pixel gets one side, nothing else does
    half = mask.shape[1] // 2
    assert np.array_equal(labels[:, :half] == RIGHT_LUNG, mask[:, :half])  # the image's left is the right lung
    assert np.array_equal(labels[:, half:] == LEFT_LUNG, mask[:, half:])


def test_swapped_sides_swap_labels():
    mask = _two_lungs()
    labels = lung_sides(mask)
    mirrored = lung_sides(mask[:, ::-1])[:, ::-1]
    assert np.array_equal(mirrored == LEFT_LUNG, labels == RIGHT_LUNG)
    assert np.array_equal(mirrored == RIGHT_LUNG, labels == LEFT_LUNG)


def test_merged_lungs_are_cut_at_the_mediastinum():
    mask = _two_lungs(gap=30)
    bridge = mask.copy()
    bridge[150:175, 80:180] = True  # the two lungs joined below the heart: one component
    assert cv2.connectedComponents(bridge.astype(np.uint8))[0] - 1 == 1
    labels = lung_sides(bridge)
    assert np.array_equal(labels > 0, bridge)
    reference = lung_sides(mask)
    for side in (RIGHT_LUNG, LEFT_LUNG):  # each lung keeps (almost) exactly its own pixels
        truth = reference == side
        got = labels == side
        assert 2 * (got & truth).sum() / (got.sum() + truth.sum()) > 0.95
    xs_right = np.nonzero(labels == RIGHT_LUNG)[1]
    xs_left = np.nonzero(labels == LEFT_LUNG)[1]
    assert xs_right.max() < xs_left.min()  # a clean cut


def test_tilted_lungs_overlapping_in_x_stay_whole():
    m = np.zeros((256, 256), bool)  # a rotated patient: both lungs lean the same way
    m = _ellipse(m, 82, 120, 34, 95, angle=25)
    m = _ellipse(m, 170, 128, 36, 97, angle=25)
    labels = lung_sides(m)
    n, comp = cv2.connectedComponents(m.astype(np.uint8))
    assert n == 3
    xs = [np.nonzero(comp == c)[1] for c in (1, 2)]
    assert xs[0].max() > xs[1].min()  # no vertical line separates them
    for c in range(1, n):  # each lung is one side whole
        assert len(np.unique(labels[comp == c])) == 1
    assert set(np.unique(labels)) == {0, RIGHT_LUNG, LEFT_LUNG}


def test_one_lung_goes_to_its_side():
    m = np.zeros((256, 256), bool)
    only_left = _ellipse(m, 180, 120, 45, 90)  # on the image's right: the patient's left lung
    assert set(np.unique(lung_sides(only_left))) == {0, LEFT_LUNG}
    only_right = only_left[:, ::-1]
    assert set(np.unique(lung_sides(only_right))) == {0, RIGHT_LUNG}
    assert not lung_sides(np.zeros((64, 64), bool)).any()


def test_specks_follow_the_side_they_lie_on():
    mask = _two_lungs()
    specks = mask.copy()
    specks[10:13, 20:23] = True  # a speck high on the image's left
    specks[240:243, 230:233] = True  # and one low on its right
    labels = lung_sides(specks)
    assert labels[11, 21] == RIGHT_LUNG and labels[241, 231] == LEFT_LUNG
    assert np.array_equal(labels > 0, specks)


def test_region_split_at_native_size_is_disjoint_and_exact():
    small = _two_lungs()
    small[150:175, 80:180] = True
    native = cv2.resize(small.astype(np.uint8) * 255, (1013, 877), interpolation=cv2.INTER_LINEAR) >= 128
    right, left = split_by_region(native, right_lung_region(lung_sides(small)))
    assert not (right & left).any() and np.array_equal(right | left, native)
    assert right[:, :400].sum() > 0.99 * native[:, :400].sum()  # the image's left is the right lung


def test_lung_fields_rle_fraction_and_area():
    right = np.zeros((40, 50), bool)
    right[5:15, 5:20] = True
    left = np.zeros((40, 50), bool)
    left[5:25, 30:40] = True
    f = lung_fields(right, left, [0.2, 0.5])
    assert np.array_equal(rle.decode(f["right_lung_rle"]), right) and np.array_equal(rle.decode(f["left_lung_rle"]), left)
    assert f["right_lung_rle"]["size"] == [40, 50]
    assert f["right_lung_fraction"] == round(150 / 2000, 6) and f["left_lung_fraction"] == round(200 / 2000, 6)
    assert f["right_lung_mm2"] == pytest.approx(150 * 0.1) and f["left_lung_mm2"] == pytest.approx(200 * 0.1)
    assert lung_fields(right, left, None)["right_lung_mm2"] is None


def _check_rows(out):
    """Every ok row: the two lungs' RLEs are disjoint and their union is exactly the mask PNG."""
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert ok
    for r in ok:
        mask = read_gray(out / r["mask_path"]) > 0
        right, left = rle.decode(r["right_lung_rle"]), rle.decode(r["left_lung_rle"])
        assert not (right & left).any(), r["path"]
        assert np.array_equal(right | left, mask), r["path"]
        assert r["right_lung_fraction"] == pytest.approx(right.mean(), abs=1e-6)
    return ok


def test_segment_rows_split_the_mask_exactly(tmp_path, example_images):
    from typer.testing import CliRunner

    from lungmask_kit.cli.app import app

    res = CliRunner().invoke(app, ["segment", str(example_images), "-o", str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    ok = _check_rows(tmp_path / "out")
    assert {r["convention"] for r in ok} == {"v7"}
    # the patient's right lung is the image's left: its pixels lie left of the left lung's
    for r in ok:
        right, left = rle.decode(r["right_lung_rle"]), rle.decode(r["left_lung_rle"])
        assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean(), r["path"]
        assert r["right_lung_mm2"] is None  # PNGs carry no pixel spacing
    meta = json.loads(pq.read_schema(tmp_path / "out" / "manifest.parquet").metadata[b"lungkit"])
    assert meta["convention"] == "v7"


def test_lung_areas_in_mm2_from_dicom_pixel_spacing(tmp_path, example_images):
    from lungmask_kit.segment import SegmentOptions, run_segment

    pixels = read_gray(example_images / "ieee_b39f5cf9.png")
    write_dicom(tmp_path / "in" / "a.dcm", pixels, PixelSpacing=[0.2, 0.25])
    write_dicom(tmp_path / "in" / "b.dcm", pixels)  # ImagerPixelSpacing 0.139 only
    run_segment(tmp_path / "in", tmp_path / "out", SegmentOptions(progress=False))
    rows = {r["path"]: r for r in _check_rows(tmp_path / "out")}
    for name, spacing in (("a.dcm", 0.2 * 0.25), ("b.dcm", 0.139 * 0.139)):
        r = rows[name]
        right = int(rle.decode(r["right_lung_rle"]).sum())
        assert r["right_lung_mm2"] == pytest.approx(right * spacing, abs=0.01)
        assert r["left_lung_mm2"] > 0


def _tiny_model(tmp_path, conventions):
    from lungmask_kit.models import ModelConfig, build_model, save_model

    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", encoder="resnet18", input_size=64, classes=len(conventions), conventions=conventions)
    return save_model(build_model(cfg), cfg, tmp_path / "tiny" / "model.safetensors").parent


def test_convention_is_in_the_resume_key_and_the_manifest(tmp_path, small_corpus):
    from lungmask_kit.segment import SegmentOptions, run_segment

    weights = _tiny_model(tmp_path, ["v7", "jsrt"])
    out = tmp_path / "out"

    def run(convention):
        return run_segment(small_corpus, out, SegmentOptions(weights=weights, convention=convention, progress=False))

    assert run("v7").processed == 3
    again = run("jsrt")  # another convention redoes every image
    assert again.processed == 3 and again.skipped == 0
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["convention"] for r in rows} == {"jsrt"}
    assert run("jsrt").skipped == 3  # and resumes within it
    assert run("v7").processed == 3


def test_a_model_without_the_convention_is_refused(tmp_path, small_corpus, capsys):
    from lungmask_kit.cli.app import main

    weights = _tiny_model(tmp_path, ["v7"])
    assert main(["segment", str(small_corpus), "-o", str(tmp_path / "out"), "-w", str(weights), "--convention", "jsrt"]) == 4
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err and len(errors) == 1 and "no output for the 'jsrt' convention" in errors[0]
    assert main(["segment", str(small_corpus), "-o", str(tmp_path / "o2"), "--convention", "nih"]) == 2


def test_config_refuses_conventions_that_do_not_match_the_outputs():
    from lungmask_kit.errors import WeightsError
    from lungmask_kit.models import ModelConfig

    assert ModelConfig(classes=2, conventions=["v7", "jsrt"]).problem() is None
    for bad in (["v7"], ["v7", "v7"], ["v7", "nih"]):
        assert "conventions" in ModelConfig(classes=2, conventions=bad).problem()
    with pytest.raises(WeightsError, match="jsrt"):
        ModelConfig().output_index("jsrt")


def test_initialise_from_copies_outputs_by_convention(tmp_path):
    from lungmask_kit.models import ModelConfig, build_model
    from lungmask_kit.models.modeling import initialise_from, load_bundle

    parent = load_bundle(_tiny_model(tmp_path, ["v7"]))
    cfg = ModelConfig(encoder="resnet18", input_size=64, classes=2, conventions=["v7", "jsrt"])
    child = build_model(cfg)
    initialise_from(child, cfg, parent)
    p, c = parent.model.state_dict(), child.state_dict()
    assert all(torch.equal(p[k], c[k]) for k in p if not k.startswith("segmentation_head."))
    for key in ("segmentation_head.0.weight", "segmentation_head.0.bias"):
        assert torch.equal(c[key][0], p[key][0]) and torch.equal(c[key][1], p[key][0])
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        out = child.eval()(x)
        assert torch.allclose(out[:, 0], parent.model(x)[:, 0], atol=1e-5)


def _pairs(root, n, convention, seed):
    """Synthetic CXRs whose masks are the lung fields; in the jsrt convention a band in the middle (the heart)
    is cut from the left lung, as the visible-lung convention does."""
    for i in range(n):
        img = cxr_like(96, 96, seed=seed + i)
        mask = img < 110
        if convention == "jsrt":
            mask[50:, 55:75] = False
        write_png(root / "images" / f"{convention}{i}.png", img)
        write_png(root / "masks" / f"{convention}{i}.png", mask.astype(np.uint8) * 255)
    return root


def test_train_both_conventions_then_segment_and_calibrate(tmp_path):
    from lungmask_kit.cli.app import main
    from lungmask_kit.segment import SegmentOptions, run_segment

    v7, jsrt = _pairs(tmp_path / "v7", 10, "v7", 0), _pairs(tmp_path / "jsrt", 8, "jsrt", 100)
    run = tmp_path / "run"
    assert main(["train", str(v7), str(jsrt), "--convention", "v7", "--convention", "jsrt", "-o", str(run),
                 "--encoder", "resnet18", "--epochs", "2", "--batch-size", "4", "--val-fraction", "0.25",
                 "--device", "cpu", "-q"]) == 0
    config = json.loads((run / "best.json").read_text())
    assert config["conventions"] == ["v7", "jsrt"] and config["classes"] == 2
    assert config["provenance"]["images_per_convention"] == {"v7": {"train": 8, "val": 2}, "jsrt": {"train": 6, "val": 2}}
    assert config["quality"]["format"] == "lungkit-quality/2"
    assert set(config["quality"]["conventions"]) == {"v7", "jsrt"}
    assert config["quality"]["report"]["images_per_convention"] == {"v7": 10, "jsrt": 8}
    log = json.loads((run / "log.json").read_text())
    assert {"val_dice_v7", "val_dice_jsrt"} <= set(log[0])
    for convention in ("v7", "jsrt"):
        out = tmp_path / f"seg-{convention}"
        s = run_segment(v7 / "images", out, SegmentOptions(weights=run / "best.safetensors", convention=convention,
                                                            progress=False))
        assert s.ok == 10 and not s.uncalibrated
        rows = pq.read_table(out / "manifest.parquet").to_pylist()
        assert {r["convention"] for r in rows} == {convention}
        assert all(r["est_dice"] is not None for r in rows)
    # fine-tuning a one-convention model into both: its output is copied to each, then trained
    assert main(["train", str(v7), "-o", str(tmp_path / "one"), "--encoder", "resnet18", "--epochs", "1",
                 "--batch-size", "4", "--val-fraction", "0.25", "--device", "cpu", "-q"]) == 0
    assert main(["train", str(v7), str(jsrt), "--convention", "v7", "--convention", "jsrt", "-o", str(tmp_path / "ft"),
                 "--encoder", "resnet18", "--init", str(tmp_path / "one" / "best.safetensors"), "--epochs", "1",
                 "--batch-size", "4", "--val-fraction", "0.25", "--device", "cpu", "-q"]) == 0
    ft = json.loads((tmp_path / "ft" / "best.json").read_text())
    assert ft["conventions"] == ["v7", "jsrt"] and ft["provenance"]["initialised_from"]["sha256"]
    assert ft["mean"] == json.loads((tmp_path / "one" / "best.json").read_text())["mean"]


def test_train_refuses_mismatched_convention_count(tmp_path):
    from lungmask_kit.errors import LungkitError
    from lungmask_kit.training.trainer import TrainSettings, train

    v7 = _pairs(tmp_path / "v7", 4, "v7", 0)
    settings = TrainSettings(data=[str(v7), str(v7)], conventions=["v7", "jsrt", "v7"], out=str(tmp_path / "run"),
                             encoder="resnet18", input_size=64, epochs=1)
    with pytest.raises(LungkitError, match="one --convention for all data or one per data"):
        train(settings, torch.device("cpu"), progress=False, log=lambda _: None)


def test_calibrate_with_one_convention_keeps_or_leaves_the_other(tmp_path):
    from lungmask_kit.inference import Segmenter
    from lungmask_kit.training.calibrate import calibrate_model

    # 40 pairs each: 10 validation images per convention, the least `lungkit calibrate` accepts
    v7, jsrt = _pairs(tmp_path / "v7", 40, "v7", 0), _pairs(tmp_path / "jsrt", 40, "jsrt", 100)
    weights = _tiny_model(tmp_path, ["v7", "jsrt"])
    said = []
    reports = calibrate_model(str(v7), weights, tmp_path / "one", 0.25, 0, "cpu", progress=False, log=said.append)
    assert set(reports) == {"v7"} and any("jsrt convention: its output stays uncalibrated" in s for s in said)
    assert Segmenter(tmp_path / "one", torch.device("cpu"), "v7").quality is not None
    assert Segmenter(tmp_path / "one", torch.device("cpu"), "jsrt").quality is None  # null columns, said by the run

    calibrate_model([str(v7), str(jsrt)], weights, tmp_path / "both", 0.25, 0, "cpu", progress=False,
                    log=lambda _: None, conventions=["v7", "jsrt"])
    before = json.loads((tmp_path / "both" / "config.json").read_text())["quality"]["conventions"]["jsrt"]
    said.clear()
    calibrate_model(str(v7), tmp_path / "both", None, 0.25, 0, "cpu", progress=False, log=said.append)
    after = json.loads((tmp_path / "both" / "config.json").read_text())["quality"]["conventions"]
    assert after["jsrt"] == before and any("jsrt convention: its shape statistics and est_dice are kept" in s for s in said)
    assert Segmenter(tmp_path / "both", torch.device("cpu"), "jsrt").quality is not None
    # the image gate fitted on both collections stays: refitted on v7's alone it would be narrowed to it
    assert any("the image gate is kept as stored" in s for s in said)
    from lungmask_kit.models.modeling import load_bundle

    both_tensors = load_bundle(tmp_path / "both").quality_tensors
    calibrate_model([str(v7), str(jsrt)], weights, tmp_path / "again", 0.25, 0, "cpu", progress=False,
                    log=lambda _: None, conventions=["v7", "jsrt"])
    gate_of_both = load_bundle(tmp_path / "again").quality_tensors["quality.image.mean"]
    assert np.array_equal(both_tensors["quality.image.mean"], gate_of_both)  # not refitted on v7 alone
    calibrate_model(str(v7), tmp_path / "both", None, 0.25, 0, "cpu", progress=False, log=lambda _: None,
                    refit_gate=True)
    assert not np.array_equal(load_bundle(tmp_path / "both").quality_tensors["quality.image.mean"], gate_of_both)


def test_evaluate_compares_like_with_like_and_scores_each_lung(tmp_path, example_images, example_masks, capsys):
    from typer.testing import CliRunner

    from lungmask_kit.cli.app import app, main

    runner = CliRunner()
    out = tmp_path / "seg"
    assert runner.invoke(app, ["segment", str(example_images), "-o", str(out), "-q"]).exit_code == 0
    assert main(["evaluate", str(out / "manifest.parquet"), "--truth", str(example_masks), "-o",
                 str(tmp_path / "ev"), "--convention", "jsrt"]) == 2
    err = capsys.readouterr().err
    assert "compare like with like" in err and "Traceback" not in err
    res = runner.invoke(app, ["evaluate", str(out / "manifest.parquet"), "--truth", str(example_masks), "-o",
                              str(tmp_path / "ev"), "--convention", "v7"])
    assert res.exit_code == 0, res.output
    assert "v7 / v7" in res.output
    summary = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert summary["truth_convention"] == "v7" and summary["prediction_convention"] == "v7"
    assert summary["dice_right_lung"]["mean"] > 0.85 and summary["dice_left_lung"]["mean"] > 0.85
    # a folder of masks says no convention: compared, and the summary says so
    res = runner.invoke(app, ["evaluate", str(out / "masks"), "--truth", str(example_masks), "-o", str(tmp_path / "ev2")])
    assert res.exit_code == 0 and "not said / not said" in res.output


def test_variants_carries_the_convention_and_splits_the_lungs(tmp_path, example_images, example_masks):
    from lungmask_kit.variants import VariantsOptions, run_variants

    out = tmp_path / "var"
    run_variants(out, VariantsOptions(progress=False, convention="v7"), images=example_images, masks=example_masks)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {r["convention"] for r in rows} == {"v7"}
    for r in rows:
        mask = read_gray(example_masks / r["path"]) > 0
        right, left = rle.decode(r["right_lung_rle"]), rle.decode(r["left_lung_rle"])
        assert np.array_equal(right | left, mask) and not (right & left).any()
    unknown = tmp_path / "var2"
    run_variants(unknown, VariantsOptions(progress=False), images=example_images, masks=example_masks)
    assert {r["convention"] for r in pq.read_table(unknown / "manifest.parquet").to_pylist()} == {None}


def test_report_tints_the_two_lungs_apart():
    from lungmask_kit.report.overlay import overlay

    image = np.full((100, 120), 128, np.uint8)
    labels = np.zeros((100, 120), np.uint8)
    labels[20:80, 10:50], labels[20:80, 70:110] = RIGHT_LUNG, LEFT_LUNG
    out = overlay(image, labels, 120)
    right, left = out[50, 30].astype(int), out[50, 90].astype(int)
    assert right[0] > right[2] and left[2] > left[0]  # BGR: the right lung blue, the left orange
    plain = overlay(image, labels > 0, 120)
    assert np.array_equal(plain[50, 30], plain[50, 90])  # a mask without sides: one tint


def test_publish_carries_both_lungs(tmp_path, small_corpus):
    from lungmask_kit.publish.build import PublishOptions, publish
    from lungmask_kit.segment import SegmentOptions, run_segment

    run_segment(small_corpus, tmp_path / "run", SegmentOptions(progress=False))
    for masks_only in (True, False):
        target = tmp_path / f"ds-{masks_only}"
        publish(tmp_path / "run", target, PublishOptions(masks_only=masks_only, progress=False, license="cc-by-4.0"))
        rows = [r for f in sorted((target / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
        assert len(rows) == 3
        for r in rows:
            right, left = rle.decode(r["right_lung_rle"]), rle.decode(r["left_lung_rle"])
            mask = rle.decode(r["mask_rle"]) if masks_only else cv2.imdecode(np.frombuffer(r["mask"]["bytes"], np.uint8), 0) > 0
            assert np.array_equal(right | left, mask) and r["convention"] == "v7"
        card = (target / "README.md").read_text()
        assert "`right_lung_rle`" in card and "Annotation convention: `v7`" in card


def test_one_folder_never_mixes_conventions(tmp_path, small_corpus, capsys):
    """A v7 run, then a jsrt run of some of its images into the same OUT, left rows of both under metadata naming
    one; CheXmask paths took v7 masks as jsrt."""
    from lungmask_kit.cli.app import main

    weights = _tiny_model(tmp_path, ["v7", "jsrt"])
    out = tmp_path / "out"
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(weights), "-q"]) == 0
    capsys.readouterr()
    args = ["segment", str(small_corpus), "-o", str(out), "-w", str(weights), "--convention", "jsrt", "--glob", "ieee_b*", "-q"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "would mix both conventions" in err
    assert main([*args, "--overwrite"]) == 0  # replaced, not mixed in
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["convention"] for r in rows] == ["jsrt"]
    # the whole folder in the other convention is fine: every row is redone
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(weights), "-q"]) == 0
    assert {r["convention"] for r in pq.read_table(out / "manifest.parquet").to_pylist()} == {"v7"}
    assert main(["variants", "--chexmask", str(tmp_path / "none.csv"), "--images", str(small_corpus), "-o",
                 str(tmp_path / "var"), "--convention", "v7", "-q"]) == 2
    assert "contradicts --chexmask" in capsys.readouterr().err

"""`lungkit variants` on real masks and on bad pairs."""

import os

import cv2
import numpy as np
import pandas as pd
import pytest

from lungmask_kit.cli.app import main
from lungmask_kit.variants import VariantsOptions, run_variants

from conftest import cxr_like, shared, write_png


def _read(path):
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


def test_shared_cxr_seg_pixel_exact_crop_and_qc(tmp_path):
    data = shared("cxr-seg")
    out = tmp_path / "out"
    assert main(["variants", "--images", str(data / "images"), "--masks", str(data / "masks"), "-o", str(out),
                 "--crop", "--margin", "5", "-j", "2", "-q"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    assert len(m) == len(os.listdir(data / "images")) and (m.status == "ok").all()
    for row in m.itertuples():
        img = _read(data / "images" / row.path)
        mask = _read(data / "masks" / row.mask_path) > 0
        y0, y1, x0, x1 = row.crop_box
        ys, xs = np.nonzero(mask)
        assert y0 <= ys.min() and ys.max() < y1 and x0 <= xs.min() and xs.max() < x1  # box holds every mask pixel
        assert y0 == max(ys.min() - 5, 0) and x1 == min(xs.max() + 6, img.shape[1])
        crop = (slice(y0, y1), slice(x0, x1))
        np.testing.assert_array_equal(_read(out / row.lungs_path), np.bitwise_and(img, np.where(mask, 255, 0).astype(np.uint8))[crop])
        np.testing.assert_array_equal(_read(out / row.nolungs_path), np.where(~mask, img, 0)[crop])
        assert row.lung_area_fraction == pytest.approx(mask.mean(), abs=1e-6)
        assert row.qc_pass == (row.lung_area_fraction >= 0.15)


def test_bad_pairs_are_rows_and_batch_goes_on(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    img = cxr_like(64, 48)
    mask = np.zeros_like(img)
    mask[10:50, 5:40] = 255
    for name in ("good", "nomask", "mismatch", "unreadable", "antialiased", "zero_one"):
        write_png(images / f"{name}.png", img)
    write_png(masks / "good.png", mask)
    write_png(masks / "mismatch.png", mask[:30])
    (masks / "unreadable.png").write_bytes(b"garbage")
    aa = cv2.GaussianBlur(mask, (5, 5), 0)
    write_png(masks / "antialiased.png", aa)
    write_png(masks / "zero_one.png", (mask > 0).astype(np.uint8))
    out = tmp_path / "out"
    assert main(["variants", "--images", str(images), "--masks", str(masks), "-o", str(out), "-j", "1", "-q"]) == 1
    m = pd.read_parquet(out / "manifest.parquet").set_index("path")
    assert m.loc["nomask.png", "error"] == "no mask for this image"
    assert "differs from image size" in m.loc["mismatch.png", "error"]
    assert m.loc["unreadable.png", "error"].startswith("mask:")
    for ok in ("good.png", "antialiased.png", "zero_one.png"):
        assert m.loc[ok, "status"] == "ok"
        agree = ((_read(out / m.loc[ok, "lungs_path"]) > 0) == ((mask > 0) & (img > 0))).mean()
        assert agree == 1.0 or (ok == "antialiased.png" and agree > 0.995)
    # asked for: resize the mismatched mask (nearest neighbour)
    s = run_variants(out, VariantsOptions(resize_masks=True, jobs=1, progress=False), images=images, masks=masks)
    assert s.failed == 2 and s.ok == 4
    # same settings again: the four done rows are skipped, the failed ones retried
    again = run_variants(out, VariantsOptions(resize_masks=True, jobs=1, progress=False), images=images, masks=masks)
    assert again.skipped == 4 and again.processed == 2


def test_from_manifest_never_replaces_it_unless_asked(small_corpus, tmp_path, random_weights):
    seg = tmp_path / "seg"
    assert main(["segment", str(small_corpus), "-o", str(seg), "-w", str(random_weights), "-q"]) == 0
    before = (seg / "manifest.parquet").read_bytes()
    assert main(["variants", str(seg / "manifest.parquet"), "-o", str(seg), "-q"]) == 2
    assert (seg / "manifest.parquet").read_bytes() == before
    out = tmp_path / "var"
    assert main(["variants", str(seg / "manifest.parquet"), "-o", str(out), "--only", "lungs", "--crop", "-j", "1", "-q"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    assert len(m) == 3 and m.nolungs_path.isna().all() and not (out / "nolungs").exists()


def test_only_rejects_unknown_variant(tmp_path, example_images, example_masks):
    assert main(["variants", "--images", str(example_images), "--masks", str(example_masks), "-o", str(tmp_path / "o"),
                 "--only", "lungs,heart", "-q"]) == 2


def test_summary_has_no_rate_for_a_run_with_nothing_to_do_and_points_flagged_runs_to_the_report(
        tmp_path, example_images, example_masks, capsys):
    from lungmask_kit.cli.app import main

    args = ["variants", "--images", str(example_images), "--masks", str(example_masks), "-o", str(tmp_path / "v"),
            "-j", "1", "--min-lung-fraction", "0.9"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "images processed per second" in first and f"lungkit report {tmp_path / 'v'}" in first
    assert main(args) == 0  # resumed: every image done before
    again = capsys.readouterr().out
    assert "nothing to process" in again and "0.00 images" not in again


def test_variants_of_a_segment_run_keep_its_verdicts_and_flags(tmp_path, small_corpus):
    """`variants MANIFEST --crop` of a segment run: the same masks, so the model's est_dice, ood scores, heart and
    CTR stand, and so do the flags its thresholds gave (they were dropped and the images un-flagged)."""
    import pyarrow.parquet as pq

    from lungmask_kit.cli.app import main

    seg = tmp_path / "seg"
    assert main(["segment", str(small_corpus), "-o", str(seg), "--min-est-dice", "0.99", "-q"]) == 0
    source = {r["path"]: r for r in pq.read_table(seg / "manifest.parquet").to_pylist()}
    assert not any(r["qc_pass"] for r in source.values())
    var = tmp_path / "var"
    assert main(["variants", str(seg / "manifest.parquet"), "-o", str(var), "--crop", "-j", "1", "-q"]) == 0
    rows = pq.read_table(var / "manifest.parquet").to_pylist()
    assert len(rows) == 3
    for r in rows:
        s = source[r["path"]]
        for column in ("est_dice", "ood_score", "ood_image_score", "ctr", "heart_fraction"):
            assert r[column] == s[column], column
        assert r["qc_pass"] is False and "low estimated Dice" in r["qc_reason"]
    assert pq.read_schema(var / "manifest.parquet").names[:5] == pq.read_schema(seg / "manifest.parquet").names[:5]

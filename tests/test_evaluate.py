import math
import shutil

import cv2

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from lungmask_kit.cli.app import main
from lungmask_kit.metrics import dice, hd95, iou

from conftest import write_png


def test_metrics_on_hand_made_masks():
    a = np.zeros((50, 50), bool)
    b = np.zeros((50, 50), bool)
    a[10:20, 10:20] = True  # 100 px
    b[10:20, 15:25] = True  # 100 px, overlap 50
    assert dice(a, b) == pytest.approx(0.5)
    assert iou(a, b) == pytest.approx(50 / 150)
    assert hd95(a, b) == pytest.approx(5.0)  # a pure 5-pixel shift
    assert dice(a, a) == 1.0 and hd95(a, a) == 0.0
    empty = np.zeros_like(a)
    assert dice(empty, empty) == 1.0 and dice(a, empty) == 0.0 and math.isnan(hd95(a, empty))


def test_evaluate_cli_per_image_not_pooled(tmp_path):
    truth = np.zeros((40, 40), np.uint8)
    truth[5:35, 5:35] = 255
    write_png(tmp_path / "truth" / "good.png", truth)
    write_png(tmp_path / "truth" / "bad.png", truth)
    write_png(tmp_path / "pred" / "good.png", truth)
    half = truth.copy()
    half[:, 20:] = 0
    write_png(tmp_path / "pred" / "bad.png", half)
    assert main(["evaluate", str(tmp_path / "pred"), "--truth", str(tmp_path / "truth"), "-o", str(tmp_path / "ev"), "-q"]) == 0
    m = pd.read_parquet(tmp_path / "ev" / "metrics.parquet").set_index("path")
    assert m.loc["good.png", "dice"] == 1.0  # keyed by the path as given, so it joins a manifest
    assert m.loc["bad.png", "dice"] == pytest.approx(2 * 450 / (450 + 900))
    import json

    s = json.loads((tmp_path / "ev" / "summary.json").read_text())
    assert s["dice"]["mean"] == pytest.approx((1 + 2 * 450 / 1350) / 2)  # per-image mean, not pooled
    assert s["dice"]["min"] == pytest.approx(2 * 450 / 1350)


def test_evaluate_a_variants_manifest_reads_its_masks_where_they_are(tmp_path, example_images, example_masks):
    """A variants manifest's mask_path is relative to its masks_root (the masks it was given), not to itself."""
    from lungmask_kit.cli.app import main

    out = tmp_path / "var"
    assert main(["variants", "--images", str(example_images), "--masks", str(example_masks), "-o", str(out), "-q"]) == 0
    assert main(["evaluate", str(out / "manifest.parquet"), "--truth", str(example_masks), "-o", str(tmp_path / "ev"), "-q"]) == 0
    rows = pq.read_table(tmp_path / "ev" / "metrics.parquet").to_pylist()
    assert len(rows) == 8 and all(r["status"] == "ok" and r["dice"] == 1.0 for r in rows)


def test_truth_that_is_not_masks_is_refused_naming_the_first(tmp_path, example_images, example_masks, capsys):
    from lungmask_kit.cli.app import main

    pred = tmp_path / "pred"
    shutil.copytree(example_masks, pred)
    assert main(["evaluate", str(pred), "--truth", str(example_images), "-o", str(tmp_path / "ev"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    first = sorted(p.name for p in example_images.glob("*.png"))[0]
    assert len(err.splitlines()) == 1 and "not a binary mask" in err and first in err
    # anti-aliased masks (soft edges) are still masks
    soft = tmp_path / "soft"
    for p in example_masks.glob("*.png"):
        m = cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)
        write_png(soft / p.name, cv2.GaussianBlur(m, (5, 5), 0))
    assert main(["evaluate", str(pred), "--truth", str(soft), "-o", str(tmp_path / "ev2"), "-q"]) == 0


def test_hd95_in_mm_follows_the_pixel_spacing():
    from scipy.spatial.distance import cdist

    from lungmask_kit.metrics import _boundary, hd95

    a = np.zeros((60, 50), bool)
    a[10:40, 8:30] = True
    b = np.zeros_like(a)
    b[14:46, 12:38] = True
    px = hd95(a, b)
    assert hd95(a, b, (0.5, 0.5)) == pytest.approx(px * 0.5)
    ys_a, xs_a = np.nonzero(_boundary(a))
    ys_b, xs_b = np.nonzero(_boundary(b))
    spacing = (0.3, 0.9)
    d = cdist(np.c_[ys_a * spacing[0], xs_a * spacing[1]], np.c_[ys_b * spacing[0], xs_b * spacing[1]])
    brute = max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))
    assert hd95(a, b, spacing) == pytest.approx(brute, rel=1e-6)

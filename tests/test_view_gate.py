"""The view gate: frontal chest radiograph or not, on collections it never saw; what a flagged row says it looks
like; `calibrate --negatives`."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from lungmask_kit.qc import QCThresholds, qc_reasons, reason_counts, short_reason
from lungmask_kit.segment import SegmentOptions, run_segment

from conftest import EXAMPLE, shared, write_calibration_pairs


def _skimage_picture(name: str) -> Path:
    import skimage

    return Path(skimage.__file__).parent / "data" / name


def test_acquisition_augment_changes_the_look_never_the_input():
    from lungmask_kit.training.view_gate import acquisition_augment

    image = cv2.imread(str(sorted((EXAMPLE / "images").iterdir())[0]), cv2.IMREAD_GRAYSCALE)
    before = image.copy()
    rng = np.random.default_rng(0)
    copies = [acquisition_augment(image, rng) for _ in range(6)]
    assert np.array_equal(image, before)
    assert all(c.dtype == np.uint8 and c.ndim == 2 for c in copies)
    assert len({c.tobytes() for c in copies}) == 6
    # 16-bit input (a DICOM's pixels) comes out 8-bit, not clipped to black or white
    wide = acquisition_augment((image.astype(np.uint16) * 64 + 1000), np.random.default_rng(1))
    assert wide.dtype == np.uint8 and 20 < wide.mean() < 235


def test_a_negatives_kind_comes_from_its_folder_else_its_dicom_header(tmp_path):
    """--negatives FOLDER: a CT or MR slice outside a kind folder is cross-sectional by its header, a DICOM
    radiograph whose ViewPosition is lateral is lateral, a PNG is other; a kind folder overrides the header."""
    import pydicom
    from pydicom.data import get_testdata_file

    from lungmask_kit.training.view_gate import negatives_in, read_negatives

    folder = tmp_path / "negatives"
    (folder / "other").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), folder / "mr.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "other" / "ct-said-other.dcm")
    lateral = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    lateral.Modality, lateral.ViewPosition = "CR", "LL"
    lateral.save_as(folder / "cr-lateral.dcm")
    shutil.copy(_skimage_picture("camera.png"), folder / "camera.png")
    negatives = sorted(negatives_in(folder), key=lambda n: n.path.name)
    images, kinds, unreadable = read_negatives(negatives)
    assert unreadable == [] and len(images) == 5
    assert dict(zip([n.path.name for n in negatives], kinds)) == {
        "camera.png": "other", "cr-lateral.dcm": "lateral", "ct-said-other.dcm": "other", "ct.dcm": "cross-sectional",
        "mr.dcm": "cross-sectional"}


def test_a_flagged_rows_reason_says_what_the_image_looks_like():
    row = {"lung_area_fraction": 0.3, "ood_image_score": 4.2, "view_guess": "lateral", "ood_shape_score": 0.4}
    (reason,) = qc_reasons(row, QCThresholds(max_ood_score=1.0))
    assert reason.startswith("not like the frontal chest X-rays the model knows (looks like a lateral radiograph;")
    assert short_reason(reason) == "not a frontal CXR (lateral?)"
    ct = qc_reasons({**row, "view_guess": "cross-sectional"}, QCThresholds(max_ood_score=1.0))[0]
    density = qc_reasons({**row, "view_guess": None}, QCThresholds(max_ood_score=1.0))[0]
    # a density gate (no guess) keeps today's reason; each guess is its own report sheet
    assert reason_counts([reason, ct, density]) == {"not a frontal CXR (lateral?)": 1, "not a frontal CXR (CT/MR?)": 1,
                                                    "not a frontal CXR (image)": 1}
    # a looser gate passes the row: no reason, whatever the guess
    assert qc_reasons(row, QCThresholds(max_ood_score=5.0)) == []


def test_the_bundled_gate_passes_frontal_films_and_names_the_rest(tmp_path):
    """The bundled example's frontal CXRs pass; a photograph and (where the shared data is) a lateral radiograph
    and a CT slice are flagged, each saying what it looks like."""
    src = tmp_path / "in"
    shutil.copytree(EXAMPLE / "images", src)
    shutil.copy(_skimage_picture("camera.png"), src / "camera.png")
    expected = {"camera.png": "other"}
    ood = shared("cxr-ood")
    if ood is not None:
        for name, kind in (("cavitating-pneumonia-4-day0-L.png", "lateral"), ("16745_2_2.png", "cross-sectional")):
            shutil.copy(ood / "images" / name, src / name)
            expected[name] = kind
    run_segment(src, tmp_path / "out", SegmentOptions(progress=False))
    table = pq.read_table(tmp_path / "out" / "manifest.parquet")
    meta = json.loads(table.schema.metadata[b"lungkit"])
    assert meta["quality"]["image_gate"] == "view"
    rows = {r["path"]: r for r in table.to_pylist()}
    for path, row in rows.items():
        if path in expected:
            assert row["view_guess"] == expected[path] and row["ood_image_score"] > 1, path
            assert "not like the frontal chest X-rays the model knows (looks like" in row["qc_reason"], path
        else:
            assert row["view_guess"] == "frontal" and row["ood_image_score"] <= 1, (path, row["ood_image_score"])


def test_a_view_gate_holds_on_a_collection_and_patients_it_never_saw():
    """Fitted on one frontal collection (cxr-seg-jsrt) and the other images but two patients', it passes another
    hospital's CXRs (cxr-heart) and flags the left-out patients' lateral radiograph and CT slices."""
    jsrt, heart, ood = shared("cxr-seg-jsrt"), shared("cxr-heart"), shared("cxr-ood")
    if None in (jsrt, heart, ood):
        pytest.skip("shared data absent")
    from lungmask_kit.imaging import read_model_view
    from lungmask_kit.inference import Segmenter
    from lungmask_kit.runtime import prepare_device
    from lungmask_kit.training.view_gate import (
        FRONTAL_COPIES, Negative, augmented_pooled, fit_view_gate, package_negatives, pooled_of, read_negatives)

    seg = Segmenter(None, prepare_device("cpu"))
    rng = np.random.default_rng(0)
    fit = [read_model_view(jsrt / r["image"]) for r in list(csv.DictReader(open(jsrt / "pairs.csv")))[:60]]
    frontal = np.concatenate([pooled_of(seg, fit[:48]), augmented_pooled(seg, fit[:48], FRONTAL_COPIES, rng)])
    listed = list(csv.DictReader(open(ood / "list.csv")))
    kind = {r["name"]: "lateral" if r["view"] == "L" else "cross-sectional" for r in listed}
    held = [r["name"] for r in listed if r["patient_id"] in ("92", "210")]
    negatives = package_negatives() + [Negative(ood / "images" / n, k) for n, k in kind.items() if n not in held]
    images, kinds, _ = read_negatives(negatives)
    other = np.concatenate([pooled_of(seg, images), augmented_pooled(seg, images, 3, rng)])
    gate = fit_view_gate(frontal, pooled_of(seg, fit[48:]), other, kinds + [k for k in kinds for _ in range(3)])

    unseen = [read_model_view(p) for p in sorted((heart / "images").iterdir())[:40]]
    scores, _ = gate.scores(pooled_of(seg, unseen))
    assert np.mean(scores > 1) <= 0.05, np.sort(scores)[-5:]
    scores, guesses = gate.scores(pooled_of(seg, [read_model_view(ood / "images" / n) for n in held]))
    assert (scores > 1).all(), dict(zip(held, scores))
    assert guesses[0] == "lateral", dict(zip(held, guesses))


def test_calibrate_with_negatives_fits_a_view_gate_and_refuses_a_missing_folder(tmp_path, capsys):
    from lungmask_kit.cli.app import main

    data = write_calibration_pairs(tmp_path / "data")
    assert main(["calibrate", str(data), "-o", str(tmp_path / "never"), "--negatives", str(tmp_path / "none"), "-q"]) == 2
    assert "--negatives" in capsys.readouterr().err and not (tmp_path / "never").exists()
    negatives = tmp_path / "negatives" / "other"
    negatives.mkdir(parents=True)
    for name in ("coins.png", "moon.png", "page.png"):
        shutil.copy(_skimage_picture(name), negatives / name)
    assert main(["calibrate", str(data), "-o", str(tmp_path / "cal"), "--val-fraction", "0.45", "--negatives",
                 str(negatives.parent), "-q"]) == 0
    quality = json.loads((tmp_path / "cal" / "config.json").read_text())["quality"]
    assert quality["view"]["classes"][0] == "frontal" and "image" not in quality
    assert quality["conventions"]["v7"]["report"]["image_gate"] == "view"
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(sorted((data / "images").iterdir())[0], src / "chest.png")
    shutil.copy(_skimage_picture("camera.png"), src / "camera.png")
    run_segment(src, tmp_path / "out", SegmentOptions(weights=tmp_path / "cal" / "model.safetensors", progress=False))
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "out" / "manifest.parquet").to_pylist()}
    assert rows["chest.png"]["view_guess"] == "frontal"
    assert rows["camera.png"]["view_guess"] == "other" and rows["camera.png"]["qc_pass"] is False

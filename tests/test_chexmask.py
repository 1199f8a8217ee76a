"""CheXmask in and out: its run-length layout, `variants --chexmask` and `publish --chexmask` (issue 25, part 1)."""

from __future__ import annotations

import csv
import json

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest

from lungmask_kit import chexmask
from lungmask_kit.cli.app import main
from lungmask_kit.postprocess import LEFT_LUNG, RIGHT_LUNG, lung_sides



def reference_decode(text: str, height: int, width: int) -> np.ndarray:
    """CheXmask's rule, written from its description: "start length" pairs, starts 1-indexed into the row-major
    flattened image."""
    flat = np.zeros(height * width, np.uint8)
    values = [int(v) for v in text.split()]
    for start, length in zip(values[::2], values[1::2]):
        flat[start - 1:start - 1 + length] = 255
    return flat.reshape(height, width) > 0


def reference_encode(mask: np.ndarray) -> str:
    flat = np.concatenate([[0], mask.ravel().astype(int), [0]])
    runs = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    runs[1::2] -= runs[::2]
    return " ".join(map(str, runs))


@pytest.mark.parametrize("seed", range(4))
def test_run_length_strings_match_chexmasks_rule(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 53)) > 0.6
    mask[0, 0] = mask[-1, -1] = True  # runs touching both ends
    text = chexmask.encode(mask)
    assert text == reference_encode(mask)
    assert np.array_equal(chexmask.decode(text, 37, 53), mask)
    assert np.array_equal(reference_decode(text, 37, 53), mask)
    with pytest.raises(ValueError, match="leaves"):
        chexmask.decode("1960 5", 37, 53)
    with pytest.raises(ValueError, match="out of bounds"):
        chexmask.decode("1 5", 70000, 70000)


def _chexmask_csv(path, example_masks, names, half=(), low_rca=()):
    """A CheXmask-layout CSV of the example masks (right / left lung by lungkit's rule), written with CheXmask's
    encoding; `half`: rows given at half size; `low_rca`: rows with Dice RCA (Mean) 0.5."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Dice RCA (Mean)", "Dice RCA (Max)", "Landmarks", "Left Lung", "Right Lung", "Heart",
                    "Height", "Width"])
        for name in names:
            mask = cv2.imread(str(example_masks / name), cv2.IMREAD_GRAYSCALE) > 0
            if name in half:
                mask = cv2.resize(mask.astype(np.uint8), (mask.shape[1] // 2, mask.shape[0] // 2),
                                  interpolation=cv2.INTER_NEAREST) > 0
            sides = lung_sides(mask)
            w.writerow([name, 0.5 if name in low_rca else 0.91, 0.95, "", reference_encode(sides == LEFT_LUNG),
                        reference_encode(sides == RIGHT_LUNG), "", mask.shape[0], mask.shape[1]])
        w.writerow(["not-here.png", 0.9, 0.9, "", "1 2", "5 2", "", 10, 10])  # an image the folder lacks


def test_variants_from_a_chexmask_csv(tmp_path, example_images, example_masks):
    names = sorted(p.name for p in example_images.glob("*.png"))
    table = tmp_path / "ChestX-Ray8.csv"
    _chexmask_csv(table, example_masks, names, half={names[1]}, low_rca={names[2]})
    out = tmp_path / "var"
    assert main(["variants", "--chexmask", str(table), "--images", str(example_images), "-o", str(out),
                 "--min-rca", "0.7", "-j", "1", "-q"]) in (0, 1)
    rows = {r["path"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert set(rows) == set(names) - {names[2]}  # the low-RCA row dropped, the unknown image ignored
    assert all(r["status"] == "ok" and r["convention"] == "jsrt" for r in rows.values())
    assert rows[names[1]]["mask_source"].startswith("chexmask") and "resized (nearest)" in rows[names[1]]["mask_source"]
    assert rows[names[0]]["mask_source"] == "chexmask" and rows[names[0]]["mask_quality"] == pytest.approx(0.91)
    image = cv2.imread(str(example_images / names[0]), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(example_masks / names[0]), cv2.IMREAD_GRAYSCALE) > 0
    lungs = cv2.imread(str(out / rows[names[0]]["lungs_path"]), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(lungs, np.where(mask, image, 0).astype(image.dtype))


def test_publish_chexmask_round_trip(tmp_path, example_images, example_masks):
    run = tmp_path / "run"
    assert main(["variants", "--images", str(example_images), "--masks", str(example_masks), "-o", str(run),
                 "-j", "1", "-q"]) == 0
    ds = tmp_path / "ds"
    assert main(["publish", str(run), "-o", str(ds), "--include-flagged", "--chexmask", "-q"]) == 0
    with open(ds / "chexmask.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 and all(r["Heart"] == "" for r in rows)
    for r in rows:
        right = reference_decode(r["Right Lung"], int(r["Height"]), int(r["Width"]))
        left = reference_decode(r["Left Lung"], int(r["Height"]), int(r["Width"]))
        truth = cv2.imread(str(example_masks / r["Path"]), cv2.IMREAD_GRAYSCALE) > 0
        assert np.array_equal(right | left, truth) and not (right & left).any()
    assert "chexmask.csv" in (ds / "SHA256SUMS").read_text() and "est_dice" in (ds / "README.md").read_text()


def test_evaluate_against_chexmask_truth(tmp_path, example_images, example_masks, capsys):
    names = sorted(p.name for p in example_images.glob("*.png"))
    table = tmp_path / "ChestX-Ray8.csv"
    _chexmask_csv(table, example_masks, names, half={names[1]})
    run = tmp_path / "run"
    assert main(["variants", "--images", str(example_images), "--masks", str(example_masks), "-o", str(run),
                 "--convention", "jsrt", "-j", "1", "-q"]) == 0
    assert main(["evaluate", str(run), "--truth-chexmask", str(table), "-o", str(tmp_path / "ev"), "-q"]) == 0
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "ev" / "metrics.parquet").to_pylist()}
    assert set(rows) == set(names)
    for name in names:
        expected = 1.0 if name != names[1] else pytest.approx(1.0, abs=0.03)  # the half-size truth, resized
        assert rows[name]["dice"] == expected and rows[name]["truth_mask"] == f"chexmask:{name}"
        assert rows[name]["dice_right_lung"] == expected and rows[name]["dice_left_lung"] == expected
    assert json.loads((tmp_path / "ev" / "summary.json").read_text())["truth_resized"] == 1
    assert main(["evaluate", str(run), "-o", str(tmp_path / "ev2"), "-q"]) == 2  # no truth given
    assert "give a truth: --truth MASKS, --truth-chexmask CSV" in capsys.readouterr().err


def _row(image_id: str) -> chexmask.Row:
    return chexmask.Row(image_id, "1 2", "5 2", 10, 10, 0.9, 0.9)


def test_an_id_with_folders_never_matches_on_a_shared_file_name():
    # CheXpert: view1_frontal.jpg is in every study; patient00001's row must not reach patient00005's image
    images = ["train/patient00005/study1/view1_frontal.png", "train/patient00007/study2/view1_frontal.png"]
    rows = [_row("CheXpert-v1.0/train/patient00001/study1/view1_frontal.jpg"),
            _row("CheXpert-v1.0/train/patient00005/study1/view1_frontal.jpg")]
    m = chexmask.match_images(rows, images)
    assert m.matched == {images[0]: rows[1]} and m.unmatched == [rows[0]] and not m.ambiguous
    # a flat folder of images cannot tell the studies apart: every row is refused, named and counted
    flat = chexmask.match_images(rows, ["view1_frontal.png"])
    assert not flat.matched and len(flat.ambiguous) == 2 and "2 ambiguous id(s) refused" in flat.note()


def test_a_bare_id_matches_one_image_by_name_or_stem_and_refuses_several():
    m = chexmask.match_images([_row("00000001_000.png"), _row("abc")], ["a/00000001_000.png", "x/abc.png", "y/abc.png"])
    assert set(m.matched) == {"a/00000001_000.png"} and m.ambiguous == ["abc"]


def test_variants_gives_no_image_another_patients_chexmask_mask(tmp_path, example_images, example_masks, capsys):
    name = "ieee_b39f5cf9.png"
    images = tmp_path / "images"
    for patient in ("patient00005", "patient00009"):
        (images / patient / "study1").mkdir(parents=True)
        (images / patient / "study1" / "view1_frontal.png").write_bytes((example_images / name).read_bytes())
    mask = cv2.imread(str(example_masks / name), cv2.IMREAD_GRAYSCALE) > 0
    sides = lung_sides(mask)
    table = tmp_path / "chexpert.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Path", "Dice RCA (Mean)", "Left Lung", "Right Lung", "Heart", "Height", "Width"])
        for patient in ("patient00001", "patient00005"):
            w.writerow([f"CheXpert-v1.0/train/{patient}/study1/view1_frontal.jpg", 0.9, reference_encode(sides == LEFT_LUNG),
                        reference_encode(sides == RIGHT_LUNG), "", mask.shape[0], mask.shape[1]])
    out = tmp_path / "var"
    assert main(["variants", "--chexmask", str(table), "--images", str(images), "-o", str(out), "-j", "1"]) == 0
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["path"] for r in rows] == ["patient00005/study1/view1_frontal.png"]  # patient00009 got no one's mask
    assert "1 image(s) matched, 1 row(s) match no image" in capsys.readouterr().err


def _padded_square(mask: np.ndarray, side: int = 1024) -> np.ndarray:
    """CheXmask's preprocessed layout: the image padded to a centred square, scaled to side x side."""
    h, w = mask.shape
    longest = max(h, w)
    square = np.zeros((longest, longest), np.uint8)
    top, left = (longest - h) // 2, (longest - w) // 2
    square[top:top + h, left:left + w] = mask
    return cv2.resize(square, (side, side), interpolation=cv2.INTER_NEAREST) > 0


def test_chexmasks_square_padded_masks_are_unpadded_and_a_foreign_aspect_refused(tmp_path, example_images, example_masks):
    from lungmask_kit.metrics import dice

    name = "ieee_thnov10p5641g006-c.png"  # 375x277: not square
    truth = cv2.imread(str(example_masks / name), cv2.IMREAD_GRAYSCALE) > 0
    padded = _padded_square(truth)
    heart = np.zeros_like(truth)
    heart[150:230, 130:230] = True
    stretched = cv2.resize(truth.astype(np.uint8), (600, 300), interpolation=cv2.INTER_NEAREST) > 0
    images = tmp_path / "images"
    images.mkdir()
    (images / name).write_bytes((example_images / name).read_bytes())
    (images / "other.png").write_bytes((example_images / name).read_bytes())
    table = tmp_path / "cx.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Dice RCA (Mean)", "Left Lung", "Right Lung", "Heart", "Height", "Width"])
        sides = lung_sides(padded)
        w.writerow([name, 0.9, reference_encode(sides == LEFT_LUNG), reference_encode(sides == RIGHT_LUNG),
                    reference_encode(_padded_square(heart)), 1024, 1024])
        sides = lung_sides(stretched)
        w.writerow(["other.png", 0.9, reference_encode(sides == LEFT_LUNG), reference_encode(sides == RIGHT_LUNG), "",
                    300, 600])
    out = tmp_path / "var"
    assert main(["variants", "--chexmask", str(table), "--images", str(images), "-o", str(out), "-j", "1", "-q"]) == 1
    rows = {r["path"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    ok = rows[name]
    assert ok["status"] == "ok" and "padded to a square: un-padded" in ok["mask_source"]
    lungs = cv2.imread(str(out / ok["lungs_path"]), cv2.IMREAD_UNCHANGED) > 0
    image = cv2.imread(str(example_images / name), cv2.IMREAD_UNCHANGED) > 0
    assert dice(lungs, truth & image) > 0.98  # stretched onto the 375x277 image it was 0.83
    assert dice(rle_decode(ok["heart_rle"]), heart) > 0.97 and ok["ctr"] is not None
    assert rows["other.png"]["status"] == "error" and "fits neither" in rows["other.png"]["error"]


def rle_decode(value) -> np.ndarray:
    from lungmask_kit import rle

    return rle.decode(value)


def test_hostile_chexmask_rows_are_counted_or_error_rows_never_tracebacks(tmp_path, example_images, example_masks,
                                                                          capsys):
    name = "ieee_thnov10p5641g006-c.png"
    mask = cv2.imread(str(example_masks / name), cv2.IMREAD_GRAYSCALE) > 0
    sides = lung_sides(mask)
    right, left = reference_encode(sides == RIGHT_LUNG), reference_encode(sides == LEFT_LUNG)
    h, w = mask.shape
    images = tmp_path / "images"
    images.mkdir()
    cases = {"good": (right, left, h, w, 0.9), "inf": (right, left, "inf", w, 0.9), "huge": (right, left, "1e400", w, 0.9),
             "nanrca": (right, left, h, w, "nan"), "bigint": ("99999999999999999999999 5", left, h, w, 0.9),
             "declared": ("1 5", "9 5", 20000, 20000, 0.9)}
    for case in [*cases, "short"]:
        (images / f"{case}.png").write_bytes((example_images / name).read_bytes())
    table = tmp_path / "cx.csv"
    with open(table, "w", newline="", encoding="utf-8") as fh:
        fh.write("\ufeff")  # a BOM before the header, as spreadsheet exports write it
        wr = csv.writer(fh)
        wr.writerow(["Image Index", "Dice RCA (Mean)", "Left Lung", "Right Lung", "Heart", "Height", "Width"])
        for case, (r, l, hh, ww, rca) in cases.items():
            wr.writerow([f"{case}.png", rca, l, r, "", hh, ww])
        wr.writerow(["short.png", 0.9])  # a short row
    out = tmp_path / "var"
    code = main(["variants", "--chexmask", str(table), "--images", str(images), "-o", str(out), "--min-rca", "0.7",
                 "-j", "1"])
    captured = capsys.readouterr()
    assert code == 1 and "Traceback" not in captured.err
    assert "3 unreadable row(s) skipped" in captured.err  # inf, 1e400 and the short row; NaN RCA below --min-rca
    rows = {r["path"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert set(rows) == {"good.png", "bigint.png", "declared.png"}
    assert rows["good.png"]["status"] == "ok"
    assert rows["bigint.png"]["status"] == "error" and "not a CheXmask run-length string" in rows["bigint.png"]["error"]
    assert "larger than any layout" in rows["declared.png"]["error"]
    assert "unexpected" not in rows["bigint.png"]["error"] + rows["declared.png"]["error"]


def test_read_csv_streams_ids_then_only_the_masks_it_was_asked_for(tmp_path):
    table = tmp_path / "cx.csv"
    with open(table, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(["dicom_id", "Left Lung", "Right Lung", "Heart", "Height", "Width"])
        for i in range(50):
            wr.writerow([f"id{i}", "1 2", "5 2", "9 1", 10, 10])
    ids = chexmask.read_csv(table, with_masks=False)
    assert len(ids.rows) == 50 and all(r.right == r.left == r.heart == "" for r in ids.rows)
    some = chexmask.read_csv(table, ids.id_column, only_ids={"id3", "id7"})
    assert [(r.image_id, r.right, r.heart) for r in some.rows] == [("id3", "5 2", "9 1"), ("id7", "5 2", "9 1")]


def test_a_chexmask_variants_run_publishes_and_reports_its_masks(tmp_path, example_images, example_masks):
    from lungmask_kit.report import ReportOptions, build_report

    names = sorted(p.name for p in example_images.glob("*.png"))[:3]
    table = tmp_path / "ChestX-Ray8.csv"
    _chexmask_csv(table, example_masks, names)
    run = tmp_path / "var"
    assert main(["variants", "--chexmask", str(table), "--images", str(example_images), "-o", str(run), "-j", "1",
                 "-q"]) == 0
    for mode in ([], ["--masks-only"]):
        ds = tmp_path / f"ds{len(mode)}"
        assert main(["publish", str(run), "-o", str(ds), "--include-flagged", "-q", *mode]) == 0
        rows = pq.read_table(next((ds / "data").glob("*.parquet"))).to_pylist()
        assert len(rows) == 3
        for r in rows:
            truth = cv2.imread(str(example_masks / r["path"]), cv2.IMREAD_GRAYSCALE) > 0
            if mode:
                assert np.array_equal(rle_decode(r["mask_rle"]), truth)
            else:
                assert np.array_equal(cv2.imdecode(np.frombuffer(r["mask"]["bytes"], np.uint8), 0) > 0, truth)
    summary = build_report(run, tmp_path / "rep", ReportOptions(progress=False, sample=10))
    assert summary.no_outline == 0 and summary.unrendered == 0

"""classify on corpora without patient ids (Kaggle-style folders full of copies), its output folder, and what
it says it left out: issue 23's classify findings."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
import pytest

from lungmask_kit.classify.grouping import group_copies, patients_from_paths
from lungmask_kit.cli.app import _after_interrupt, main

from conftest import cxr_like, write_png

TINY = ["--arch", "resnet18", "--image-size", "32", "--epochs", "1", "--batch-size", "8", "--device", "cpu",
        "--bootstrap", "100", "--seeds", "1", "--variant", "original", "--no-saliency", "-q"]


def test_exact_and_near_copies_of_real_cxrs_are_one_pseudo_patient(tmp_path, example_images):
    originals = sorted(example_images.glob("*.png"))
    files, keys, digests = [], [], []
    for i, src in enumerate(originals):
        image = cv2.imread(str(src), cv2.IMREAD_GRAYSCALE)
        copy = tmp_path / f"exact-{i}.png"
        shutil.copy(src, copy)
        near = cv2.flip(np.clip(image.astype(np.float32) * 1.1 + 10, 0, 255).astype(np.uint8), 1)
        near = cv2.resize(near, (image.shape[1] * 3 // 4, image.shape[0] * 3 // 4), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(tmp_path / f"near-{i}.jpg"), near, [cv2.IMWRITE_JPEG_QUALITY, 70])
        for name, path in ((f"orig-{i}", src), (f"exact-{i}", copy), (f"near-{i}", tmp_path / f"near-{i}.jpg")):
            keys.append(name)
            files.append(path)
            digests.append(f"sha-{i}" if name != f"near-{i}" else None)  # the exact copy shares the sha256
    groups, grouping = group_copies(keys, digests, files)
    assert len(set(groups.values())) == len(originals)
    for i in range(len(originals)):
        assert groups[f"orig-{i}"] == groups[f"exact-{i}"] == groups[f"near-{i}"]
    assert grouping.merged_exact == len(originals) and grouping.merged_near == len(originals)


def test_patient_ids_from_paths():
    found = patients_from_paths(["p12/a.png", "p12/b.png", "p7/c.png", "loose.png"], r"^p(\d+)/")
    assert found == {"p12/a.png": "12", "p12/b.png": "12", "p7/c.png": "7"}
    with pytest.raises(Exception, match="not a regular expression"):
        patients_from_paths(["a"], "(")


@pytest.fixture
def copies_manifest(tmp_path, random_weights):
    """covid/ and negative/ folders of synthetic CXRs, each also present as a byte-identical copy."""
    src = tmp_path / "cls"
    for i in range(12):
        for label, seed in (("covid", i), ("negative", 100 + i)):
            path = write_png(src / label / f"{label[0]}{i}.png", cxr_like(72, 64, seed=seed))
            shutil.copy(path, src / label / f"{label[0]}{i}-copy.png")
    out = tmp_path / "seg"
    assert main(["segment", str(src), "-o", str(out), "-w", str(random_weights), "--min-lung-fraction", "0", "-q"]) == 0
    return out


def test_copies_stay_on_one_side_and_the_results_say_how_patients_were_grouped(copies_manifest, tmp_path):
    out = tmp_path / "run"
    assert main(["classify", str(copies_manifest), "-o", str(out), "--labels-from-folders", *TINY]) == 0
    tested = set(pd.read_parquet(out / "predictions.parquet")["image"])
    assert tested
    for path in tested:  # the copy of every tested image was tested too, never trained on
        twin = path.replace("-copy.png", ".png") if "-copy" in path else path.replace(".png", "-copy.png")
        assert twin in tested
    results = (out / "results.md").read_text()
    assert "48 image(s) without a patient id grouped into 24 pseudo-patient(s): 24 exact copies" in results


def test_classify_refuses_a_foreign_folder_and_keeps_its_cache_in_its_own(copies_manifest, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert main(["classify", str(copies_manifest), "-o", str(mine), "--labels-from-folders", *TINY]) == 2
    assert "did not make" in capsys.readouterr().err and [p.name for p in mine.iterdir()] == ["notes.txt"]
    out = tmp_path / "run"
    assert main(["classify", str(copies_manifest), "-o", str(out), "--labels-from-folders", *TINY]) == 0
    (out / ".cache").mkdir()
    (out / ".cache" / "keep.txt").write_text("not lungkit's")
    assert main(["classify", str(copies_manifest), "-o", str(out), "--labels-from-folders", "--cache", "disk", *TINY]) == 0
    assert (out / ".cache" / "keep.txt").read_text() == "not lungkit's" and not (out / ".lungkit-cache").exists()


def test_rows_left_out_by_their_split_are_counted(copies_manifest, tmp_path):
    rows = pd.read_parquet(copies_manifest / "manifest.parquet")["path"].tolist()
    splits = {p: ("test" if "3" in p or "5" in p else "train") for p in rows}
    blank = [p for p in rows if "7" in p]
    odd = [p for p in rows if "9" in p]
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,split\n" + "".join(
        f"{p},{p.split('/')[0]},{'' if p in blank else 'holdout' if p in odd else splits[p]}\n" for p in rows))
    out = tmp_path / "run"
    assert main(["classify", str(copies_manifest), "-o", str(out), "--labels", str(labels), *TINY]) == 0
    results = (out / "results.md").read_text()
    assert f"{len(blank) + len(odd)} image(s) left out" in results and f"{len(odd)} 'holdout'" in results
    assert f"{len(blank)} '(blank)'" in results


def test_an_interrupt_says_what_it_means_for_each_command():
    assert "resume" in _after_interrupt(["segment", "in", "-o", "out"])
    assert "resume" in _after_interrupt(["publish", "out", "-o", "ds"])
    assert "--resume" in _after_interrupt(["train", "data", "-o", "run"])
    assert "starts over" in _after_interrupt(["classify", "out", "-o", "cls"])
    assert "starts over" in _after_interrupt(["-q", "report", "out"])


def test_too_few_test_patients_give_no_interval_no_p_value_and_no_claim():
    from lungmask_kit.classify.audit import summarize

    rng = np.random.default_rng(0)
    labels = [1] * 30 + [0] * 3  # one negative patient with three images
    patients = [f"p{i}" for i in range(30)] + ["n0"] * 3
    good, bad = np.array([0.9] * 30 + [0.1] * 3), rng.random(33)
    metrics, comparisons = summarize(labels, patients, {"lungs": [good], "nolungs": [bad]}, 0.5, 500, 0)
    assert metrics["lungs"]["roc_auc_ci95"] is None and "1 negative" in metrics["lungs"]["note"]
    (c,) = comparisons
    assert c["p_value"] is None and c["difference_ci95"] is None and "no claim either way" in c["sentence"]


def test_the_outside_the_lungs_sentence_follows_the_numbers():
    from lungmask_kit.classify.audit import summarize

    rng = np.random.default_rng(1)
    labels = [1] * 40 + [0] * 40
    patients = [f"p{i}" for i in range(80)]
    chance_a, chance_b = rng.random(80), rng.random(80)  # both near AUC 0.5: nothing "does as well"
    _, (c,) = summarize(labels, patients, {"lungs": [chance_a], "nolungs": [chance_b]}, 0.5, 500, 0)
    assert "cannot be told apart" in c["sentence"] and "cues outside" not in c["sentence"]
    strong = np.array(labels) * 0.6 + rng.random(80) * 0.4
    strong_too = np.array(labels) * 0.6 + rng.random(80) * 0.4
    _, (c,) = summarize(labels, patients, {"lungs": [strong], "nolungs": [strong_too]}, 0.5, 500, 0)
    assert "cues outside" in c["sentence"] and c["p_value"] is not None


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_classify_precision_is_used_and_recorded(copies_manifest, tmp_path, precision):
    from lungmask_kit.runtime import cpu_has_bf16

    if precision == "bf16" and not cpu_has_bf16():
        pytest.skip("this CPU has no bf16 units")
    out = tmp_path / precision
    assert main(["classify", str(copies_manifest), "-o", str(out), "--labels-from-folders", "--precision", precision,
                 *TINY]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["settings"]["precision"] == precision
    assert 0 <= doc["variants"]["original"]["accuracy"] <= 1

import json

import cv2
import numpy as np
import pandas as pd
import pytest

from lungmask_kit.cli.app import main
from lungmask_kit.labels import match_labels, read_label_file
from lungmask_kit.metrics import binary_classification_metrics

from conftest import cxr_like, write_png

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.clip(0.35 * y + rng.random(200) * 0.65, 0, 1).round(2)  # rounded: ties exercise the AUC
    m = binary_classification_metrics(y, p, 0.5)
    pred = (p >= 0.5).astype(int)
    tn, fp, fn, tp = sklearn_metrics.confusion_matrix(y, pred).ravel()
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, pred))
    assert m["sensitivity"] == pytest.approx(sklearn_metrics.recall_score(y, pred))
    assert m["recall"] == m["sensitivity"]
    assert m["specificity"] == pytest.approx(sklearn_metrics.recall_score(y, pred, pos_label=0))
    assert m["precision"] == pytest.approx(sklearn_metrics.precision_score(y, pred))
    assert m["f1"] == pytest.approx(sklearn_metrics.f1_score(y, pred))
    assert m["roc_auc"] == pytest.approx(sklearn_metrics.roc_auc_score(y, p))


def test_label_formats_parse(tmp_path):
    covidx = tmp_path / "test.txt"
    covidx.write_text("p1 a.png positive cohen\np2 b.jpg negative rsna\n")
    rows = read_label_file(covidx)
    assert [(r.path, r.label, r.patient_id, r.split) for r in rows] == [("a.png", "positive", "p1", "test"), ("b.jpg", "negative", "p2", "test")]
    csv1 = tmp_path / "labels.csv"
    csv1.write_text("path,label,finding,patient_id\ncovid/a.png,covid,COVID-19,ieee:1\n")
    r = read_label_file(csv1)[0]
    assert (r.path, r.label, r.patient_id, r.split) == ("covid/a.png", "covid", "ieee:1", None)
    csv2 = tmp_path / "meta.csv"
    csv2.write_text("filename,class,split\nx.png,negative,train\n")
    r = read_label_file(csv2)[0]
    assert (r.path, r.label, r.split) == ("x.png", "negative", "train")
    matched, unmatched, conflicts = match_labels(["covid/a.png", "neg/x.png"], read_label_file(csv1) + read_label_file(csv2) + rows)
    # csv1 says covid/a.png is covid (ieee:1), test.txt says a.png is positive (p1): a conflict, not a first-wins
    assert set(matched) == {"neg/x.png"} and [r.path for r in unmatched] == ["b.jpg"]
    assert [(r.path, r.label) for r in conflicts] == [("covid/a.png", "covid"), ("covid/a.png", "positive")]
    agree = match_labels(["covid/a.png"], read_label_file(csv1) * 2)  # repeated identical rows are one label
    assert set(agree[0]) == {"covid/a.png"} and not agree[1] and not agree[2]


@pytest.fixture
def class_manifest(tmp_path, random_weights):
    """A segment manifest over covid/ and negative/ folders of synthetic CXRs (covid ones brighter)."""
    src = tmp_path / "cls"
    for i in range(16):
        img = cxr_like(72, 64, seed=i)
        write_png(src / "covid" / f"c{i}.png", np.clip(img.astype(int) + 40, 0, 255).astype(np.uint8))
        write_png(src / "negative" / f"n{i}.png", img)
    out = tmp_path / "seg"
    assert main(["segment", str(src), "-o", str(out), "-w", str(random_weights), "--min-lung-fraction", "0", "-q"]) == 0
    return out / "manifest.parquet"


def test_tiny_run_trains_and_writes_every_output(class_manifest, tmp_path):
    out = tmp_path / "run"
    args = ["classify", str(class_manifest), "-o", str(out), "--labels-from-folders", "--arch", "resnet18",
            "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--device", "cpu", "-q"]
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"original", "lungs", "nolungs"}
    for m in metrics.values():
        assert set(m) >= {"accuracy", "sensitivity", "specificity", "precision", "recall", "f1", "roc_auc", "confusion_matrix", "threshold", "n"}
        assert m["n"] == sum(map(sum, m["confusion_matrix"]))
    preds = pd.read_parquet(out / "predictions.parquet")
    assert list(preds.columns) == ["variant", "image", "patient_id", "label", "probability", "prediction"]
    assert len(preds) == 3 * metrics["lungs"]["n"]
    assert "| lungs |" in (out / "results.md").read_text()
    roc, bars = cv2.imread(str(out / "roc.png")), cv2.imread(str(out / "metrics.png"))
    assert roc.shape == (460, 500, 3) and bars.shape == (360, 700, 3)  # matplotlib figures at their set size
    assert len(np.unique(roc.reshape(-1, 3), axis=0)) > 50  # axes, ticks, curves and a legend, not a blank canvas
    for v in metrics:
        assert (out / "checkpoints" / f"{v}.safetensors").is_file() and (out / "checkpoints" / f"{v}.json").is_file()
    # score the trained lungs model on the same manifest
    ev = tmp_path / "eval"
    assert main(["classify", str(class_manifest), "-o", str(ev), "--labels-from-folders", "--eval-only",
                 "--checkpoint", str(out / "checkpoints" / "lungs.safetensors"), "-q"]) == 0
    assert list(json.loads((ev / "metrics.json").read_text())) == ["lungs"]


def test_patient_on_both_sides_is_refused(class_manifest, tmp_path, capsys):
    labels = tmp_path / "labels.csv"
    rows = ["path,label,patient_id,split"]
    for i in range(16):
        rows.append(f"covid/c{i}.png,covid,pc{i},{'test' if i < 4 else 'train'}")
        patient = "pc10" if i == 0 else f"pn{i}"  # n0 (test) belongs to patient pc10, whose c10 is in train
        rows.append(f"negative/n{i}.png,negative,{patient},{'test' if i < 4 else 'train'}")
    labels.write_text("\n".join(rows) + "\n")
    rc = main(["classify", str(class_manifest), "-o", str(tmp_path / "x"), "--labels", str(labels), "--variant", "lungs",
               "--image-size", "32", "--epochs", "1", "-q"])
    assert rc == 2 and "both the training and the test split" in capsys.readouterr().err


def test_covidx_names_resolve_by_split_folder(tmp_path):
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("p1 same.png positive cohen\n")
    test.write_text("p2 same.png negative rsna\n")
    rows = read_label_file(train) + read_label_file(test)
    matched, unmatched, _ = match_labels(["test/same.png", "train/same.png"], rows)
    assert matched["train/same.png"].label == "positive" and matched["test/same.png"].label == "negative"
    assert not unmatched

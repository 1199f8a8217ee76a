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
    """A segment manifest over covid/ and negative/ folders of synthetic CXRs (covid ones brighter). Each image is
    its own radiograph (a brightened copy of a negative would be the same patient: classify groups such copies)."""
    src = tmp_path / "cls"
    for i in range(16):
        covid = cxr_like(72, 64, seed=100 + i)
        write_png(src / "covid" / f"c{i}.png", np.clip(covid.astype(int) + 40, 0, 255).astype(np.uint8))
        write_png(src / "negative" / f"n{i}.png", cxr_like(72, 64, seed=i))
    out = tmp_path / "seg"
    assert main(["segment", str(src), "-o", str(out), "-w", str(random_weights), "--min-lung-fraction", "0", "-q"]) == 0
    return out / "manifest.parquet"


TINY = ["--arch", "resnet18", "--image-size", "32", "--epochs", "2", "--batch-size", "8", "--device", "cpu",
        "--bootstrap", "200", "-q"]


def test_tiny_run_trains_and_writes_every_output(class_manifest, tmp_path):
    out = tmp_path / "run"
    assert main(["classify", str(class_manifest), "-o", str(out), "--labels-from-folders", "--seeds", "2", *TINY]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    metrics = doc["variants"]
    assert set(metrics) == {"original", "lungs", "nolungs"}
    for m in metrics.values():
        assert set(m) >= {"accuracy", "sensitivity", "specificity", "precision", "recall", "f1", "roc_auc", "threshold", "n"}
        assert {f"{k}_ci95" for k in ("accuracy", "sensitivity", "roc_auc")} <= set(m) and m["seeds"] == 2
        # 3-4 test patients per class: too few for an interval, so none is given and the note says why
        assert m["note"].startswith("too few test patients") and m["accuracy_ci95"] is None and m["roc_auc_ci95"] is None
        assert len(m["per_seed"]) == 2 and all(s["n"] == sum(map(sum, s["confusion_matrix"])) for s in m["per_seed"])
        assert m["accuracy"] == pytest.approx(np.mean([s["accuracy"] for s in m["per_seed"]]))
    assert [(c["a"], c["b"]) for c in doc["comparisons"]] == [("lungs", "nolungs"), ("original", "lungs"), ("original", "nolungs")]
    assert all(c["p_value"] is None and "no claim either way" in c["sentence"] or "undefined" in c["sentence"]
               for c in doc["comparisons"])
    assert "Not enough data for intervals or p-values" in (out / "results.md").read_text()
    assert doc["source_prediction"]["skipped"]  # no source column here
    preds = pd.read_parquet(out / "predictions.parquet")
    assert list(preds.columns) == ["variant", "seed", "image", "patient_id", "label", "probability", "prediction"]
    assert len(preds) == 2 * 3 * metrics["lungs"]["n"] and set(preds.seed) == {0, 1}
    assert "| lungs |" in (out / "results.md").read_text() and "## Comparisons" in (out / "results.md").read_text()
    roc, bars = cv2.imread(str(out / "roc.png")), cv2.imread(str(out / "metrics.png"))
    assert roc.shape == (460, 500, 3) and bars.shape == (360, 700, 3)  # matplotlib figures at their set size
    assert len(np.unique(roc.reshape(-1, 3), axis=0)) > 50  # axes, ticks, curves and a legend, not a blank canvas
    assert cv2.imread(str(out / "saliency.png")) is not None
    for v in metrics:
        assert (out / "checkpoints" / f"{v}.safetensors").is_file() and (out / "checkpoints" / f"{v}-seed1.safetensors").is_file()
    # score the trained lungs model on the same manifest
    ev = tmp_path / "eval"
    assert main(["classify", str(class_manifest), "-o", str(ev), "--labels-from-folders", "--eval-only",
                 "--checkpoint", str(out / "checkpoints" / "lungs.safetensors"), "--bootstrap", "200", "-q"]) == 0
    assert list(json.loads((ev / "metrics.json").read_text())["variants"]) == ["lungs"]


def test_seeds_reproduce_and_the_disk_cache_gives_the_same_numbers(class_manifest, tmp_path):
    runs = []
    for k, cache in enumerate(("memory", "memory", "disk")):
        out = tmp_path / f"r{k}"
        assert main(["classify", str(class_manifest), "-o", str(out), "--labels-from-folders", "--variant", "lungs",
                     "--seeds", "2", "--no-saliency", "--cache", cache, *TINY]) == 0
        runs.append(json.loads((out / "metrics.json").read_text())["variants"])
        assert not (out / ".cache").exists()  # the memory-mapped files are removed at the end
    assert runs[0] == runs[1] == runs[2]


def test_source_leakage_and_leave_one_source_out(class_manifest, tmp_path):
    labels = tmp_path / "labels.csv"
    rows = ["path,label,source"]
    for i in range(16):  # two collections, each with both classes
        rows += [f"covid/c{i}.png,covid,{'a' if i % 2 else 'b'}", f"negative/n{i}.png,negative,{'a' if i % 3 else 'b'}"]
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    assert main(["classify", str(class_manifest), "-o", str(out), "--labels", str(labels), "--seeds", "1", "--variant", "original",
                 "--no-saliency", *TINY]) == 0
    doc = json.loads((out / "metrics.json").read_text())
    src = doc["source_prediction"]
    assert src["sources"] == {"a": 18, "b": 14} and set(src["variants"]) == {"original"}  # 8 + 10 and 8 + 6
    assert src["variants"]["original"]["auc"] is None or 0 <= src["variants"]["original"]["auc"] <= 1
    held = doc["leave_one_source_out"]["held_out"]
    assert set(held) == {"a", "b"} and held["a"]["n"] == 18 and held["a"]["n_train"] == 14
    assert set(held["b"]["variants"]["original"]) == {"accuracy", "sensitivity", "specificity", "roc_auc"}
    assert "## Source leakage" in (out / "results.md").read_text()


def test_bootstrap_interval_matches_a_hand_computation():
    from lungmask_kit.classify.audit import patient_draws, summarize

    # patient A: two images, both right; patient B: two images, both wrong (threshold 0.5)
    labels, probs, patients = [1, 0, 1, 0], np.array([0.9, 0.1, 0.2, 0.8]), ["A", "A", "B", "B"]
    metrics, _ = summarize(labels, patients, {"lungs": [probs]}, 0.5, 4000, 0, min_patients=1)  # the bootstrap itself
    # a draw holds AA (accuracy 1), AB or BA (0.5) or BB (0), with chances 1/4, 1/2, 1/4
    assert metrics["lungs"]["accuracy"] == 0.5 and metrics["lungs"]["accuracy_ci95"] == [0.0, 1.0]
    draws = patient_draws(patients, 4000, 0)
    share_aa = np.mean([sorted(d.tolist()) == [0, 0, 1, 1] for d in draws])
    assert share_aa == pytest.approx(0.25, abs=0.03)
    # identical patients: every draw gives the same value, so the interval has no width
    same, _ = summarize([1, 0, 1, 0], ["A", "A", "B", "B"], {"x": [np.array([0.9, 0.1, 0.9, 0.1])]}, 0.5, 500, 0,
                        min_patients=1)
    assert same["x"]["accuracy_ci95"] == [1.0, 1.0]


def test_paired_comparison_finds_a_real_difference():
    from lungmask_kit.classify.audit import summarize

    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 60)
    patients = [f"p{i}" for i in range(120)]
    good = np.clip(labels * 0.6 + rng.normal(0.2, 0.15, 120), 0, 1)  # separates the classes
    noise = rng.random(120)  # does not
    _, comparisons = summarize(labels, patients, {"lungs": [good], "nolungs": [noise]}, 0.5, 1000, 0)
    c = comparisons[0]
    assert c["difference"] > 0.3 and c["difference_ci95"][0] > 0 and c["p_value"] <= 0.002
    assert c["sentence"].startswith("lungs scores a higher AUC than nolungs")


def test_gradcam_of_a_corner_model_lies_outside_a_central_mask():
    import torch

    from lungmask_kit.classify.model import gradcam, saliency_in_lungs

    class CornerModel(torch.nn.Module):
        """Two feature channels, the top-left 8x8 corner and the rest; the score reads only the first: it looks
        at the corner and nowhere else."""

        def forward_features(self, x):
            corner = torch.zeros_like(x)
            corner[..., :8, :8] = 1
            return torch.cat([x * corner, x * (1 - corner)], dim=1)

        def forward_head(self, features):
            return features[:, :1].mean(dim=(2, 3))

        def forward(self, x):
            return self.forward_head(self.forward_features(x))

    x = torch.rand(3, 1, 32, 32) + 0.1
    cams = gradcam(CornerModel(), x)
    assert cams.shape == (3, 32, 32) and (cams >= 0).all()
    centre = np.zeros((3, 32, 32), bool)
    centre[:, 8:28, 8:28] = True
    corner = np.zeros((3, 32, 32), bool)
    corner[:, :10, :10] = True
    assert saliency_in_lungs(cams, centre).max() < 0.05
    assert saliency_in_lungs(cams, corner).min() > 0.95


def test_segmenter_encoder_initialises_a_densenet_classifier():
    import torch
    from safetensors.torch import load_file

    from lungmask_kit.classify.model import build_classifier
    from lungmask_kit.models import ModelConfig
    from lungmask_kit.models.modeling import DEFAULT_WEIGHTS

    for channels in (1, 3):
        config = ModelConfig(task="classification", arch="densenet121", encoder="densenet121", in_channels=channels, classes=1)
        model = build_classifier(config, "segmenter")
        seg = load_file(str(DEFAULT_WEIGHTS))
        own = model.state_dict()
        assert torch.equal(own["features.denseblock4.denselayer16.conv2.weight"], seg["encoder.features.denseblock4.denselayer16.conv2.weight"].float())
        conv0 = seg["encoder.features.conv0.weight"].float()
        assert torch.allclose(own["features.conv0.weight"], conv0.repeat(1, channels, 1, 1) / channels)


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

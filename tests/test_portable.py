"""Outputs that travel: a manifest names its input folder relative to itself (and absolutely), a moved corpus
still works, --input-root points a manifest at images that moved, evaluate joins the manifest, and run-folder
files hold no absolute path of the machine that made them."""

from __future__ import annotations

import json
import shutil

import pandas as pd

from lungmask_kit.cli.app import main
from lungmask_kit.manifest import read_metadata


def _segment(src, out, weights) -> int:
    return main(["segment", str(src), "-o", str(out), "-w", str(weights), "-q"])


def _variants(manifest, out, *extra) -> int:
    return main(["variants", str(manifest), "-o", str(out), "-j", "1", "-q", *map(str, extra)])


def test_manifest_records_the_input_folder_relative_and_absolute(tmp_path, small_corpus, random_weights):
    out = tmp_path / "runs" / "seg"
    assert _segment(small_corpus, out, random_weights) == 0
    meta = read_metadata(out / "manifest.parquet")
    assert meta["input_root"] == "../../in"
    assert meta["input_root_absolute"] == str(small_corpus.resolve())
    marker = json.loads((out / ".lungkit-run.json").read_text())
    assert marker == {"command": "segment", "input_root": "../../in"}


def test_a_moved_corpus_still_works(tmp_path, small_corpus, random_weights, capsys):
    out = tmp_path / "runs" / "seg"
    assert _segment(small_corpus, out, random_weights) == 0
    # the output folder moved alone: the absolute path recorded still finds the images
    moved = tmp_path / "elsewhere" / "deeper" / "seg"
    moved.parent.mkdir(parents=True)
    shutil.move(out, moved)
    assert _variants(moved / "manifest.parquet", tmp_path / "v1") == 0
    # inputs and outputs moved together (another machine, a copied project): the relative path finds them
    bundle = tmp_path / "bundle"
    (bundle / "runs").mkdir(parents=True)
    shutil.move(small_corpus, bundle / "in")
    shutil.move(moved, bundle / "runs" / "seg")
    assert _variants(bundle / "runs" / "seg" / "manifest.parquet", tmp_path / "v2") == 0
    # the images moved somewhere neither path knows: one line saying what to do, then --input-root
    shutil.move(bundle / "in", tmp_path / "images-now")
    capsys.readouterr()
    assert _variants(bundle / "runs" / "seg" / "manifest.parquet", tmp_path / "v3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--input-root" in err[0]
    assert _variants(bundle / "runs" / "seg" / "manifest.parquet", tmp_path / "v3", "--input-root", tmp_path / "images-now") == 0
    assert (pd.read_parquet(tmp_path / "v3" / "manifest.parquet").status == "ok").all()


def test_classify_finds_moved_images_with_input_root(tmp_path, small_corpus, random_weights):
    from lungmask_kit.classify import ClassifySettings, load_samples

    out = tmp_path / "seg"
    assert _segment(small_corpus, out, random_weights) == 0
    names = sorted(p.name for p in small_corpus.iterdir())
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,patient_id\n" + "".join(f"{n},{'covid' if i else 'negative'},p{i}\n" for i, n in enumerate(names)))
    shutil.move(small_corpus, tmp_path / "moved-images")
    settings = ClassifySettings(variants=["original"], include_flagged=True, input_root=str(tmp_path / "moved-images"))
    samples, info = load_samples(out / "manifest.parquet", settings, [labels])
    assert len(samples) == 3
    for sample in samples:
        original = sample.files["original"]
        assert original.parent == tmp_path / "moved-images" and original.is_file()


def test_evaluate_rows_join_the_manifest_on_path(tmp_path, example_images, example_masks, random_weights):
    out = tmp_path / "seg"
    assert _segment(example_images, out, random_weights) == 0
    assert main(["evaluate", str(out / "manifest.parquet"), "--truth", str(example_masks), "-o", str(tmp_path / "ev"), "-q"]) == 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    metrics = pd.read_parquet(tmp_path / "ev" / "metrics.parquet")
    joined = manifest.merge(metrics, on="path")
    assert len(joined) == len(manifest) == 8
    assert not any(str(tmp_path) in v for v in metrics.pred_mask.tolist() + metrics.truth_mask.tolist())


def test_label_files_extra_columns_reach_the_manifest_and_survive_a_rerun(tmp_path, small_corpus, random_weights):
    names = sorted(p.name for p in small_corpus.iterdir())
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,patient_id,source,license,view,width\n"
                      + "".join(f"{n},covid,p{i},ieee,CC BY 4.0,PA,999\n" for i, n in enumerate(names[:2])))
    covidx = tmp_path / "test.txt"
    covidx.write_text(f"p9 {names[2]} negative rsna\n")
    out = tmp_path / "out"
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights), "-q",
                 "--labels", str(labels), "--labels", str(covidx)]) == 0
    m = pd.read_parquet(out / "manifest.parquet").set_index("path")
    assert m.loc[names[0], ["source", "license", "view"]].tolist() == ["ieee", "CC BY 4.0", "PA"]
    assert m.loc[names[2], "source"] == "rsna" and m.loc[names[2], "split"] == "test"
    assert m.width.dtype.kind == "i" and (m.width != 999).all()  # the measured width wins over the file's
    # a plain re-run (no --labels, e.g. to re-flag) keeps every label column
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights), "-q", "--min-lung-fraction", "0.5"]) == 0
    again = pd.read_parquet(out / "manifest.parquet").set_index("path")
    assert again.loc[names[0], ["label", "source", "license"]].tolist() == ["covid", "ieee", "CC BY 4.0"]


def test_summary_names_the_output_folders(tmp_path, small_corpus, random_weights, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights)]) == 0
    text = capsys.readouterr().out
    assert f"{out}/masks, {out}/lungs, {out}/nolungs" in text and "model loading included" in text

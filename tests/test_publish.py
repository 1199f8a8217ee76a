"""`lungkit publish`: full datasets that Hugging Face `datasets`, pandas, polars and duckdb load pixel for pixel,
masks-only datasets that `lungkit variants` rebuilds byte for byte, a Croissant file mlcroissant validates,
checksums `sha256sum -c` accepts, and nothing of the machine that made them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from lungmask_kit.cli.app import main
from lungmask_kit.publish import PublishOptions, publish

from conftest import cxr_like, write_png


@pytest.fixture(scope="module")
def run(tmp_path_factory, example_images) -> Path:
    """A segment run with the bundled model: the 8 example CXRs with labels, split, source and licence; two
    pictures that are not CXRs (flagged) and a broken file (failed)."""
    root = tmp_path_factory.mktemp("publish")
    src = root / "in"
    shutil.copytree(example_images, src)
    for i in range(2):
        write_png(src / f"noise{i}.png", np.random.default_rng(i).integers(0, 255, (256, 256), dtype=np.uint8))
    (src / "broken.png").write_bytes(b"not an image")
    names = sorted(p.name for p in example_images.glob("*.png"))
    rows = [f"{n},{'covid' if i % 2 else 'negative'},{'test' if i < 3 else 'train'},ieee,CC BY 4.0" for i, n in enumerate(names)]
    labels = root / "labels.csv"
    labels.write_text("path,label,split,source,license\n" + "\n".join(rows) + "\n")
    assert main(["segment", str(src), "-o", str(root / "out"), "-q", "--labels", str(labels)]) == 1  # broken.png
    return root / "out"


def manifest(run: Path) -> pd.DataFrame:
    return pd.read_parquet(run / "manifest.parquet").set_index("path")


def decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_full_dataset_loads_in_hf_datasets_pixel_for_pixel(run, tmp_path):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "ds"
    assert main(["publish", str(run), "-o", str(out), "-q"]) == 0
    m = manifest(run)
    published = m[(m.status == "ok") & m.qc_pass]
    assert 0 < len(published) < (m.status == "ok").sum()  # the flagged pictures are left out
    files = {s: str(out / "data" / f"{s}-*.parquet") for s in ("train", "test")}
    ds = datasets.load_dataset("parquet", data_files=files)
    assert {s: len(ds[s]) for s in ds} == published.split.value_counts().to_dict()
    assert all(isinstance(ds["train"].features[c], datasets.Image) for c in ("image", "mask", "lungs", "nolungs"))
    src = Path(run.parent / "in")
    for split in ds:
        for row in ds[split]:
            path = row["path"]
            original = cv2.imread(str(src / path), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(np.array(row["image"]), original)
            for column, rel in (("mask", m.loc[path, "mask_path"]), ("lungs", m.loc[path, "lungs_path"]),
                                ("nolungs", m.loc[path, "nolungs_path"])):
                np.testing.assert_array_equal(np.array(row[column]), cv2.imread(str(run / rel), cv2.IMREAD_UNCHANGED))
            assert row["est_dice"] == pytest.approx(m.loc[path, "est_dice"]) and row["label"] == m.loc[path, "label"]


def test_full_dataset_reads_in_pandas_polars_duckdb(run, tmp_path):
    polars, duckdb = pytest.importorskip("polars"), pytest.importorskip("duckdb")
    out = tmp_path / "ds"
    publish(run, out, PublishOptions(include_flagged=True, progress=False))
    glob = str(out / "data" / "*.parquet")
    frame = pd.concat(pd.read_parquet(p) for p in sorted((out / "data").glob("*.parquet")))
    m = manifest(run)
    assert len(frame) == (m.status == "ok").sum()  # flagged included, failed never
    assert len(polars.read_parquet(glob)) == len(frame)
    assert duckdb.sql(f"select count(*) from read_parquet('{glob}')").fetchall()[0][0] == len(frame)
    row = frame.iloc[0]
    assert decode(row["mask"]["bytes"]).shape == (row["height"], row["width"])
    assert not {"mask_path", "lungs_path", "status", "error"} & set(frame.columns)  # run-folder columns dropped


def test_croissant_validates_and_checksums_pass(run, tmp_path):
    mlc = pytest.importorskip("mlcroissant")
    for mode in ([], ["--masks-only"]):
        out = tmp_path / f"ds{len(mode)}"
        assert main(["publish", str(run), "-o", str(out), "-q", *mode]) == 0
        ds = mlc.Dataset(jsonld=out / "croissant.json")
        assert not ds.metadata.ctx.issues.errors and not ds.metadata.ctx.issues.warnings
        assert "http://mlcommons.org/croissant/1.1" in json.loads((out / "croissant.json").read_text())["conformsTo"]
        record = next(iter(ds.records("default")))
        assert record["default/path"].decode() and ("default/image" in record) == (not mode)
        if shutil.which("sha256sum"):
            check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=out, capture_output=True, text=True)
            assert check.returncode == 0 and "FAILED" not in check.stdout, check.stdout
        listed = {line.split("  ", 1)[1] for line in (out / "SHA256SUMS").read_text().splitlines()}
        assert listed == {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}


def test_card_header_and_sections(run, tmp_path):
    import yaml

    out = tmp_path / "ds"
    publish(run, out, PublishOptions(name="cxr lungs", progress=False))
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["license"] == "cc-by-4.0"  # every published row's licence column says CC BY 4.0
    assert header["pretty_name"] == "cxr lungs" and header["size_categories"] == ["n<1K"]
    assert {c["split"] for c in header["configs"][0]["data_files"]} == {"train", "test"}
    assert set(header["task_categories"]) == {"image-segmentation", "image-classification"}
    for section in ("## Motivation", "## Composition", "## Collection process", "## Preprocessing", "## Known limits",
                    "## Uses", "## Licences", "## Citation"):
        assert section in text
    assert "lungkit-fpn-densenet121" in text and "est_dice" in text and "| covid |" in text


def test_nothing_machine_specific_is_published(run, tmp_path):
    out = tmp_path / "ds"
    publish(run, out, PublishOptions(progress=False))
    publish(run, tmp_path / "masks", PublishOptions(masks_only=True, progress=False))
    machine = [str(run.parent).encode(), str(Path.cwd()).encode(), str(Path(__file__).parents[1]).encode(), b"/tmp/"]
    for folder in (out, tmp_path / "masks"):
        for path in folder.rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not [m for m in machine if m in data], path
                assert (path.stat().st_mode & 0o777) == 0o644


def test_rle_round_trip_is_exact():
    from lungmask_kit import rle

    rng = np.random.default_rng(0)
    cases = [rng.random((97, 61)) > 0.5, np.zeros((5, 7), bool), np.ones((3, 4), bool), np.ones((1, 1), bool),
             cv2.circle(np.zeros((400, 300), np.uint8), (150, 200), 90, 1, -1).astype(bool)]
    for mask in cases:
        encoded = rle.encode(mask)
        assert encoded["size"] == list(mask.shape) and isinstance(encoded["counts"], str)
        np.testing.assert_array_equal(rle.decode(encoded), mask)
        assert rle.area(encoded) == mask.sum()
    with pytest.raises(ValueError):
        rle.decode({"size": [3, 3], "counts": "not rle!"})


def test_masks_only_rebuilds_the_runs_variants_byte_for_byte(run, tmp_path):
    out = tmp_path / "masks"
    assert main(["publish", str(run), "-o", str(out), "--masks-only", "--include-flagged", "-q"]) == 0
    table = pq.read_table(sorted((out / "data").glob("*.parquet"))[0])
    assert table.schema.field("mask_rle").type.names == ["size", "counts"] and "image" not in table.column_names
    images = tmp_path / "images"
    shutil.copytree(run.parent / "in", images)
    assert main(["variants", str(out), "--input-root", str(images), "-o", str(tmp_path / "var"), "-q"]) == 0
    m = manifest(run)
    rebuilt = manifest(tmp_path / "var")
    ok = m[m.status == "ok"]
    assert set(rebuilt.index) == set(ok.index)
    for path, row in ok.iterrows():
        for column in ("lungs_path", "nolungs_path"):
            assert (tmp_path / "var" / rebuilt.loc[path, column]).read_bytes() == (run / row[column]).read_bytes()
        assert list(rebuilt.loc[path, ["label", "source"]].fillna("-")) == list(row[["label", "source"]].fillna("-"))
    # another file under the same name is refused, not silently masked
    first = ok.index[0]
    write_png(images / first, cxr_like(seed=5))
    assert main(["variants", str(out), "--input-root", str(images), "-o", str(tmp_path / "var2"), "-q"]) == 1
    assert "sha256 mismatch" in manifest(tmp_path / "var2").loc[first, "error"]


def test_a_killed_publish_resumes_to_the_same_files(run, tmp_path, monkeypatch):
    from lungmask_kit.publish import build

    clean = tmp_path / "clean"
    publish(run, clean, PublishOptions(shard_mb=1, include_flagged=True, progress=False))
    assert len(list((clean / "data").glob("*.parquet"))) > 2

    original = build._Progress.add
    calls = {"n": 0}

    def dies_after_two(self, *args, **kwargs):
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt  # killed between shards

    monkeypatch.setattr(build._Progress, "add", dies_after_two)
    target = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        publish(run, target, PublishOptions(shard_mb=1, include_flagged=True, progress=False))
    assert not target.exists()  # nothing half-made where the dataset goes
    monkeypatch.setattr(build._Progress, "add", original)
    summary = publish(run, target, PublishOptions(shard_mb=1, include_flagged=True, progress=False))
    assert summary.resumed_shards == 2
    sums = lambda d: sorted(line for line in (d / "SHA256SUMS").read_text().splitlines() if "data/" in line)  # noqa: E731
    assert sums(target) == sums(clean)


def test_refusals_are_one_line(run, tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    assert main(["publish", str(run), "-o", str(foreign)]) == 2
    assert main(["publish", str(tmp_path), "-o", str(tmp_path / "x")]) == 2
    assert main(["variants", str(tmp_path / "mine"), "-o", str(tmp_path / "v")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("lungkit: error: ") for line in err)
    assert [p.name for p in foreign.iterdir()] == ["keep.txt"]

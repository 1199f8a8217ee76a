"""End-to-end tests of `lungkit segment` through the CLI entry point."""


import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from lungmask_kit.cli.app import main
from lungmask_kit.manifest import read_metadata

from conftest import cxr_like, write_png


def run(args) -> int:
    return main([str(a) for a in args])


def check_outputs(src, out, manifest):
    """Every ok row: binary mask at native size; lungs/nolungs exact AND / AND NOT of the image."""
    for row in manifest[manifest.status == "ok"].itertuples():
        img = cv2.imread(str(src / row.path), cv2.IMREAD_ANYDEPTH | cv2.IMREAD_ANYCOLOR)
        if img.ndim == 3:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        mask = cv2.imread(str(out / row.mask_path), cv2.IMREAD_UNCHANGED)
        lungs = cv2.imread(str(out / row.lungs_path), cv2.IMREAD_UNCHANGED)
        nolungs = cv2.imread(str(out / row.nolungs_path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == img.shape == (row.height, row.width)
        assert set(np.unique(mask)) <= {0, 255}
        assert lungs.dtype == nolungs.dtype == img.dtype
        np.testing.assert_array_equal(lungs, np.where(mask > 0, img, 0))
        np.testing.assert_array_equal(nolungs, np.where(mask > 0, 0, img))
        assert row.lung_area_fraction == pytest.approx((mask > 0).mean(), abs=1e-6)


def test_segment_real_images_writes_everything(small_corpus, tmp_path, random_weights):
    out = tmp_path / "out"
    assert run(["segment", small_corpus, "-o", out, "-w", random_weights, "-b", "2", "-q"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    assert sorted(m.path) == sorted(p.name for p in small_corpus.iterdir())
    assert (m.status == "ok").all() and m.sha256.str.len().eq(64).all()
    check_outputs(small_corpus, out, m)
    meta = read_metadata(out / "manifest.parquet")
    assert meta["postprocess"]["threshold"] == 0.5 and meta["min_lung_fraction"] == 0.15
    assert meta["device"] == "cpu" and len(meta["weights_sha256"]) == 64
    assert not (out / ".manifest-parts").exists()


def test_bit_depth_colour_and_name_collisions(tmp_path, random_weights):
    src = tmp_path / "in"
    write_png(src / "a" / "x.png", cxr_like(seed=1))
    write_png(src / "b" / "x.png", cxr_like(seed=2))
    cv2.imwrite(str(src / "a" / "x.jpg"), cxr_like(seed=3))
    write_png(src / "c" / "deep16.png", cxr_like(dtype=np.uint16))
    write_png(src / "c" / "rgb.png", np.dstack([cxr_like(seed=4)] * 3))
    out = tmp_path / "out"
    assert run(["segment", src, "-o", out, "-w", random_weights, "-q"]) == 0
    m = pd.read_parquet(out / "manifest.parquet").set_index("path")
    assert len(m) == 5 and m.mask_path.nunique() == 5 and m.lungs_path.nunique() == 5
    assert m.loc["c/deep16.png", "bit_depth"] == 16 and m.loc["c/rgb.png", "source_channels"] == 3
    assert cv2.imread(str(out / m.loc["c/deep16.png", "lungs_path"]), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    check_outputs(src, out, m.reset_index())


def test_qc_flags_but_never_deletes(small_corpus, tmp_path, random_weights):
    out = tmp_path / "out"
    assert run(["segment", small_corpus, "-o", out, "-w", random_weights, "--min-lung-fraction", "1.0", "-q"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    assert len(m) == 3 and (~m.qc_pass).all()
    assert m.qc_reason.str.contains("< min_lung_fraction 1|no lung detected").all()
    # a new threshold re-flags from the recorded fraction without re-segmenting
    assert run(["segment", small_corpus, "-o", out, "-w", random_weights, "--min-lung-fraction", "0", "-q"]) == 0
    m2 = pd.read_parquet(out / "manifest.parquet")
    assert (m2.qc_pass == (m2.lung_area_fraction > 0)).all()
    assert read_metadata(out / "manifest.parquet")["min_lung_fraction"] == 0


def test_bad_inputs_become_error_rows(small_corpus, tmp_path, random_weights, capsys):
    (small_corpus / "zero.png").write_bytes(b"")
    (small_corpus / "text.png").write_text("not an image at all")
    good = (small_corpus / "ieee_b39f5cf9.png").read_bytes()
    (small_corpus / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "out"
    assert run(["segment", small_corpus, "-o", out, "-w", random_weights, "-q"]) == 1
    m = pd.read_parquet(out / "manifest.parquet").set_index("path")
    assert len(m) == 6
    assert m.loc["zero.png", "error"].startswith("empty file")
    assert "not a decodable image" in m.loc["text.png", "error"]
    assert "truncated PNG" in m.loc["truncated.png", "error"]
    assert (m.status == "ok").sum() == 3
    assert "3 of 6 image(s) failed" in capsys.readouterr().err


def test_no_images_exit_3(tmp_path, random_weights):
    (tmp_path / "empty").mkdir()
    assert run(["segment", tmp_path / "empty", "-o", tmp_path / "out", "-w", random_weights, "-q"]) == 3


def test_resume_after_interrupt_skips_done_and_matches_clean_run(tmp_path, random_weights, monkeypatch, example_images):
    src = tmp_path / "in"
    for i in range(7):
        write_png(src / f"img{i}.png", cxr_like(300 + 7 * i, 260, seed=i))
    clean = tmp_path / "clean"
    assert run(["segment", src, "-o", clean, "-w", random_weights, "-b", "2", "-q"]) == 0

    import lungmask_kit.segment as seg
    import lungmask_kit.segment.steps as steps  # where the writer encodes

    calls = {"n": 0}
    real = steps.encode_png

    def dying(pixels):
        calls["n"] += 1
        if calls["n"] > 7:  # dies during the third image
            raise KeyboardInterrupt
        return real(pixels)

    out = tmp_path / "out"
    monkeypatch.setattr(steps, "encode_png", dying)
    with pytest.raises(KeyboardInterrupt):
        seg.run_segment(src, out, seg.SegmentOptions(weights=random_weights, batch_size=2, progress=False, workers=1))
    monkeypatch.setattr(steps, "encode_png", real)
    assert not (out / "manifest.parquet").exists()
    parts = pq.read_table(out / ".manifest-parts").to_pandas()
    assert 0 < len(parts) < 7

    summary = seg.run_segment(src, out, seg.SegmentOptions(weights=random_weights, batch_size=2, progress=False))
    assert summary.skipped == len(parts) and summary.processed == 7 - len(parts)
    m = pd.read_parquet(out / "manifest.parquet")
    assert sorted(m.path) == [f"img{i}.png" for i in range(7)] and (m.status == "ok").all()
    for kind in ("masks", "lungs", "nolungs"):
        for i in range(7):
            assert (out / kind / f"img{i}.png").read_bytes() == (clean / kind / f"img{i}.png").read_bytes()
    assert not list(out.rglob(".lungkit-tmp-*"))

    # a changed image is redone; --overwrite redoes all
    write_png(src / "img3.png", cxr_like(310, 260, seed=99))
    s2 = seg.run_segment(src, out, seg.SegmentOptions(weights=random_weights, batch_size=2, progress=False))
    assert s2.processed == 1
    s3 = seg.run_segment(src, out, seg.SegmentOptions(weights=random_weights, batch_size=2, overwrite=True, progress=False))
    assert s3.processed == 7
    # another batch size can move a mask pixel (CPU kernels differ by batch size), so it decides resume too
    s4 = seg.run_segment(src, out, seg.SegmentOptions(weights=random_weights, batch_size=3, progress=False))
    assert s4.skipped == 0 and s4.processed == 7


def test_labels_attach_and_unmatched_are_reported(small_corpus, tmp_path, random_weights, capsys):
    names = sorted(p.name for p in small_corpus.iterdir())
    train = tmp_path / "train.txt"
    train.write_text(f"p1 {names[0]} positive cohen\np2 {names[1]} negative cohen\np9 missing.png negative x\n")
    csv = tmp_path / "extra.csv"
    csv.write_text(f"filename,label,patient_id,split\n{names[2]},negative,p3,test\n../../escape.png,positive,p4,test\n")
    out = tmp_path / "out"
    assert run(["segment", small_corpus, "-o", out, "-w", random_weights, "--labels", train, "--labels", csv, "-q"]) == 0
    m = pd.read_parquet(out / "manifest.parquet").set_index("path")
    assert m.loc[names[0], ["label", "patient_id", "split"]].tolist() == ["positive", "p1", "train"]
    assert m.loc[names[2], ["label", "patient_id", "split"]].tolist() == ["negative", "p3", "test"]
    unmatched = pd.read_csv(out / "unmatched_labels.csv")
    assert sorted(unmatched.path) == ["../../escape.png", "missing.png"]
    assert "2 label row(s) match no image" in capsys.readouterr().err
    assert not (tmp_path.parent / "escape.png").exists()


def test_manifest_opens_in_pandas_and_pyarrow_dataset(small_corpus, tmp_path, random_weights):
    out = tmp_path / "out"
    run(["segment", small_corpus, "-o", out, "-w", random_weights, "-q"])
    import pyarrow.dataset as ds

    assert ds.dataset(out / "manifest.parquet").count_rows() == 3
    duckdb = pytest.importorskip("duckdb")
    assert duckdb.sql(f"select count(*) from '{out / 'manifest.parquet'}' where status = 'ok'").fetchall()[0][0] == 3
    pl = pytest.importorskip("polars")
    frame = pl.read_parquet(out / "manifest.parquet")
    assert frame.height == 3 and frame["qc_pass"].dtype == pl.Boolean

"""segment --dicom-seg: a DICOM Segmentation per DICOM input, read back with highdicom and pydicom (issue 25, part 2)."""

from __future__ import annotations

import shutil
import subprocess

import cv2
import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from lungmask_kit.cli.app import main

from conftest import write_dicom

hd = pytest.importorskip("highdicom")


def test_dicom_inputs_get_a_segmentation_that_matches_the_png_mask(tmp_path, example_images, capsys):
    src = tmp_path / "in"
    src.mkdir()
    names = sorted(p.name for p in example_images.glob("*.png"))[:2]
    for i, name in enumerate(names):  # two real CXRs as DX DICOMs (12-bit), and one PNG
        pixels = cv2.imread(str(example_images / name), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16
        write_dicom(src / f"cxr{i}.dcm", pixels, bits_stored=12, PatientID=f"P{i}", PatientName="Doe^Jane")
    shutil.copy(example_images / names[0], src / "plain.png")
    out = tmp_path / "out"
    assert main(["segment", str(src), "-o", str(out), "--dicom-seg"]) == 0
    err = capsys.readouterr().err
    assert "2 DICOM Segmentation(s)" in err and "1 input(s) are not DICOM" in err
    rows = {r["path"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert rows["plain.png"]["dicom_seg_path"] is None
    for i in range(2):
        row = rows[f"cxr{i}.dcm"]
        source = pydicom.dcmread(src / f"cxr{i}.dcm")
        seg = pydicom.dcmread(out / row["dicom_seg_path"])
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == source.StudyInstanceUID
        assert seg.SeriesInstanceUID != source.SeriesInstanceUID and seg.PatientID == f"P{i}"
        referenced = seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
        assert referenced.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert [s.SegmentLabel.split(" (")[0] for s in seg.SegmentSequence] == ["Right lung", "Left lung", "Heart"]
        assert seg.SegmentSequence[2].SegmentedPropertyTypeCodeSequence[0].CodeValue == "80891009"
        assert seg.SegmentSequence[0].SegmentAlgorithmName == "lungkit"
        labels = hd.seg.segread(out / row["dicom_seg_path"]).get_pixels_by_source_instance(
            source_sop_instance_uids=[source.SOPInstanceUID], segment_numbers=[1, 2, 3])[0]
        png = cv2.imread(str(out / row["mask_path"]), cv2.IMREAD_GRAYSCALE) > 0
        assert np.array_equal(labels[..., :2].any(-1), png) and not (labels[..., 0] & labels[..., 1]).any()
        from lungmask_kit import rle

        heart = rle.decode(row["heart_rle"])
        assert heart.any() and np.array_equal(labels[..., 2] > 0, heart)  # the heart's own frame: it may overlap
        if shutil.which("dciodvfy"):  # Debian's dicom3tools, where installed: no error in the SEG
            check = subprocess.run(["dciodvfy", str(out / row["dicom_seg_path"])], capture_output=True, text=True)
            assert "Error" not in check.stderr, check.stderr
    assert main(["segment", str(src), "-o", str(out), "--dicom-seg", "-q"]) == 0  # a re-run resumes
    assert main(["segment", str(src), "-o", str(out), "-q"]) == 0  # without it: another key, every image redone


def test_sources_with_pixel_spacing_or_without_uids(tmp_path, example_images, capsys):
    """A source with PixelSpacing gave a SEG highdicom's own reader refused; one without StudyInstanceUID became an
    error row after its PNGs were written; one without SOPInstanceUID silently got no SEG."""
    import pydicom

    pixels = cv2.imread(str(example_images / "ieee_b39f5cf9.png"), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16
    src = tmp_path / "in"
    write_dicom(src / "spacing.dcm", pixels, bits_stored=12, PixelSpacing=[0.2, 0.2])
    for name, missing in (("nosop.dcm", "SOPInstanceUID"), ("nostudy.dcm", "StudyInstanceUID")):
        write_dicom(src / name, pixels, bits_stored=12)
        ds = pydicom.dcmread(src / name)
        delattr(ds, missing)
        ds.save_as(src / name)
    out = tmp_path / "out"
    assert main(["segment", str(src), "-o", str(out), "--dicom-seg", "-q"]) == 0
    err = capsys.readouterr().err
    assert "1 DICOM Segmentation(s)" in err and "2 DICOM input(s) lack a UID a SEG must reference" in err
    rows = {r["path"]: r for r in pq.read_table(out / "manifest.parquet").to_pylist()}
    assert all(r["status"] == "ok" for r in rows.values())
    assert rows["nosop.dcm"]["dicom_seg_path"] is None and rows["nostudy.dcm"]["dicom_seg_path"] is None
    seg = hd.seg.segread(out / rows["spacing.dcm"]["dicom_seg_path"])
    source = pydicom.dcmread(src / "spacing.dcm")
    labels = seg.get_pixels_by_source_instance(source_sop_instance_uids=[source.SOPInstanceUID],
                                               segment_numbers=[1, 2])[0]
    png = cv2.imread(str(out / rows["spacing.dcm"]["mask_path"]), cv2.IMREAD_GRAYSCALE) > 0
    assert np.array_equal(labels.any(-1), png)

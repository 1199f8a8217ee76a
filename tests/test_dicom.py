"""DICOM input: files written with pydicom (uncompressed and JPEG 2000 / JPEG-LS / RLE compressed), decoded to the
pixels the outputs keep and the windowed view the model sees; header columns, QC of non-radiographs and lateral
views, error rows for what is not one 2-D image, and the bundled example converted to DICOM segmented like the PNGs."""

import cv2
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from lungmask_kit.cli.app import main
from lungmask_kit.discovery import find_images
from lungmask_kit.imaging import ImageDecodeError, decode_image, read_decoded
from lungmask_kit.qc import QCThresholds, qc_reasons

from conftest import cxr_like, write_dicom, write_png

# the tests write a header value pydicom warns about on purpose (lungkit must count such warnings)
pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR UI")


def twelve_bit(seed: int = 0) -> np.ndarray:
    return cxr_like(seed=seed, dtype=np.uint16) >> 4  # 0..4095


def test_monochrome2_8bit_keeps_pixels_and_reads_header(tmp_path):
    img = cxr_like()
    decoded = read_decoded(write_dicom(tmp_path / "a.dcm", img))
    np.testing.assert_array_equal(decoded.pixels, img)
    assert decoded.pixels.dtype == np.uint8 and decoded.bit_depth == 8
    assert decoded.windowed is None  # no window: the model sees the pixels as it sees a PNG
    h = decoded.header
    assert (h["patient_id"], h["view"], h["modality"], h["pixel_spacing"]) == ("PAT-1", "PA", "DX", [0.139, 0.139])
    assert h["sop_uid"].startswith("1.2.") and h["study_uid"] and h["series_uid"]


def test_monochrome1_12bit_is_inverted_and_windowed(tmp_path):
    v = twelve_bit()
    path = write_dicom(tmp_path / "m1.dcm", 4095 - v, "MONOCHROME1", 12, WindowCenter=1500, WindowWidth=2000)
    decoded = read_decoded(path)
    # the outputs keep every stored level, inverted so that dense is bright
    np.testing.assert_array_equal(decoded.pixels, v)
    assert decoded.pixels.dtype == np.uint16 and decoded.bit_depth == 16
    # the model sees the window (DICOM PS3.3 C.11.2.1.2 LINEAR), inverted for MONOCHROME1
    stored = (4095 - v).astype(np.float64)
    c, w = 1500 - 0.5, 2000 - 1
    expected = 255 - np.rint(np.clip((stored - c) / w + 0.5, 0, 1) * 255)
    np.testing.assert_array_equal(decoded.windowed, expected.astype(np.uint8))


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless, RLELossless], ids=["jpeg2000", "jpeg-ls", "rle"])
@pytest.mark.parametrize("bits", [12, 16])
def test_compressed_transfer_syntaxes_decode_losslessly(tmp_path, syntax, bits):
    v = twelve_bit() if bits == 12 else cxr_like(dtype=np.uint16)
    plain = read_decoded(write_dicom(tmp_path / "plain.dcm", v, bits_stored=bits, WindowCenter=2000, WindowWidth=3000))
    packed_path = write_dicom(tmp_path / "packed.dcm", v, bits_stored=bits, transfer_syntax=syntax,
                              WindowCenter=2000, WindowWidth=3000)
    packed = read_decoded(packed_path)
    assert pydicom.dcmread(packed_path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(packed.pixels, v)
    np.testing.assert_array_equal(packed.windowed, plain.windowed)


def test_voi_lut_sequence_is_the_models_view(tmp_path):
    from pydicom.dataset import Dataset

    v = twelve_bit()
    lut = Dataset()
    lut.LUTDescriptor = [4096, 0, 16]  # 4096 entries from stored value 0, 16-bit output
    table = np.rint(np.sqrt(np.arange(4096) / 4095) * 65535).astype(np.uint16)  # a gamma-like display curve
    lut.LUTData = table.astype("<u2").tobytes()
    path = write_dicom(tmp_path / "lut.dcm", v, bits_stored=12, VOILUTSequence=[lut])
    decoded = read_decoded(path)
    np.testing.assert_array_equal(decoded.pixels, v)  # the LUT changes only what the model sees
    np.testing.assert_array_equal(decoded.windowed, np.rint(table[v] / 65535 * 255).astype(np.uint8))


def test_ct_slice_in_hounsfield_units_is_shifted_and_flagged(tmp_path):
    hu = (cxr_like(dtype=np.uint16).astype(np.int32) // 32 - 1024).astype(np.int16)  # -1024 .. 1023 HU
    path = write_dicom(tmp_path / "ct.dcm", hu, bits_stored=16, Modality="CT", RescaleSlope=1, RescaleIntercept=0,
                       WindowCenter=-600, WindowWidth=1500)
    decoded = read_decoded(path)
    assert decoded.pixels.dtype == np.uint16
    np.testing.assert_array_equal(decoded.pixels.astype(np.int64), hu.astype(np.int64) + 32768)  # shifted by the range's floor
    assert decoded.header["modality"] == "CT"
    reasons = qc_reasons({"lung_area_fraction": 0.3, **decoded.header}, QCThresholds())
    assert reasons == ["not a radiograph (modality CT: CR or DX expected)"]


def test_lateral_views_are_flagged_decubitus_is_not():
    t = QCThresholds()
    for view in ("LL", "RL", "lateral", "L", "left lateral"):
        assert qc_reasons({"lung_area_fraction": 0.3, "view": view}, t) == [
            f"lateral view (view {view}): the model segments frontal views"]
    for view in ("PA", "AP", "AP Supine", "LLD", "left lateral decubitus", None):
        assert qc_reasons({"lung_area_fraction": 0.3, "view": view, "modality": "DX"}, t) == []
    assert qc_reasons({"lung_area_fraction": 0.3, "modality": "X-ray"}, t) == []  # a label file's spelling


def test_what_is_not_one_2d_image_is_a_clear_error(tmp_path):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    frames = np.stack([twelve_bit(i) for i in range(3)])
    multi = write_dicom(tmp_path / "multi.dcm", frames, bits_stored=12)
    with pytest.raises(ImageDecodeError, match=r"multi-frame DICOM \(3 frames\)") as err:
        read_decoded(multi)
    assert err.value.header["sop_uid"]  # the header still identifies the object in its error row

    sr = Dataset()
    sr.file_meta = FileMetaDataset()
    sr.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    sr.SOPClassUID, sr.SOPInstanceUID, sr.Modality = BasicTextSRStorage, sr.file_meta.MediaStorageSOPInstanceUID, "SR"
    sr.save_as(tmp_path / "report.dcm", enforce_file_format=True)
    with pytest.raises(ImageDecodeError, match=r"no pixel data \(Basic Text SR Storage\): not an image"):
        read_decoded(tmp_path / "report.dcm")

    data = write_dicom(tmp_path / "cut.dcm", twelve_bit(), bits_stored=12).read_bytes()
    with pytest.raises(ImageDecodeError, match="DICOM"):
        decode_image(data[: len(data) // 2])
    with pytest.raises(ImageDecodeError, match="not a DICOM file|DICOM"):
        decode_image(b"plain text, not an image" * 10, dicom=True)


def test_colour_dicom_becomes_luminance(tmp_path):
    gray = cxr_like()
    rgb = np.stack([gray, gray, gray], axis=-1)
    decoded = read_decoded(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB", 8))
    assert decoded.source_channels == 3
    np.testing.assert_array_equal(decoded.pixels, gray)


def test_dicom_without_preamble_or_extension_is_found_with_dicom_flag(tmp_path):
    v = twelve_bit()
    write_dicom(tmp_path / "series" / "1.2.840.113619.2.55.3", v, bits_stored=12)
    write_dicom(tmp_path / "series" / "IM0001", v, bits_stored=12, preamble=False)
    write_dicom(tmp_path / "UPPER.DCM", v, bits_stored=12)
    write_dicom(tmp_path / "DICOMDIR", v, bits_stored=12)  # an index, never an image
    (tmp_path / "notes.txt").write_text("not an image")
    write_png(tmp_path / "x.png", cxr_like())
    assert find_images(tmp_path) == ["UPPER.DCM", "x.png"]
    assert find_images(tmp_path, dicom=True) == ["UPPER.DCM", "series/1.2.840.113619.2.55.3", "series/IM0001", "x.png"]
    np.testing.assert_array_equal(decode_image((tmp_path / "series" / "IM0001").read_bytes(), dicom=True).pixels, v)


# --- the bundled example as DICOM, through `lungkit segment` and `lungkit variants` ---

@pytest.fixture(scope="module")
def dicom_runs(tmp_path_factory, example_images):
    """The example PNGs segmented as they are, and converted to 12-bit MONOCHROME1 DICOMs with a window (half of
    them JPEG 2000 compressed, one without extension or preamble), plus a CT slice, a lateral view, a multi-frame
    file and a header value pydicom warns about."""
    root = tmp_path_factory.mktemp("dicom")
    src = root / "in"
    names = sorted(p.stem for p in example_images.glob("*.png"))
    for i, name in enumerate(names):
        gray = cv2.imread(str(example_images / f"{name}.png"), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16
        target = src / (f"{name}" if i == 0 else f"{name}.dcm")
        write_dicom(target, 4095 - gray, "MONOCHROME1", 12, transfer_syntax=JPEG2000Lossless if i % 2 else None,
                    preamble=i != 0, WindowCenter=2040, WindowWidth=4080, PatientID=f"P{i}", StudyInstanceUID="1.2.bad!")
    frontal = cv2.imread(str(example_images / f"{names[1]}.png"), cv2.IMREAD_GRAYSCALE).astype(np.uint16) * 16
    write_dicom(src / "extra" / "lateral.dcm", frontal, bits_stored=12, ViewPosition="LL")
    write_dicom(src / "extra" / "ct.dcm", frontal, bits_stored=12, Modality="CT")
    write_dicom(src / "extra" / "cine.dcm", np.stack([frontal, frontal]), bits_stored=12)
    runs = {}
    for kind, folder, extra in (("png", example_images, []), ("dcm", src, ["--dicom"])):
        out = root / kind
        runs[kind] = out
        runs[f"{kind}_rc"] = main(["segment", str(folder), "-o", str(out), "-q", *extra])
    runs["names"], runs["src"] = names, src
    return runs


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


@pytest.mark.slow
def test_example_as_dicom_gives_the_png_masks(dicom_runs):
    png, dcm = dicom_runs["png"], dicom_runs["dcm"]
    assert dicom_runs["png_rc"] == 0
    for name in dicom_runs["names"]:
        a = cv2.imread(str(png / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED) > 0
        b = cv2.imread(str(dcm / "masks" / f"{name}.png"), cv2.IMREAD_UNCHANGED) > 0
        assert dice(a, b) >= 0.99, name


@pytest.mark.slow
def test_dicom_run_manifest_outputs_and_flags(dicom_runs, capfd):
    dcm, src, names = dicom_runs["dcm"], dicom_runs["src"], dicom_runs["names"]
    assert dicom_runs["dcm_rc"] == 1  # the multi-frame file failed; the batch went on
    m = pd.read_parquet(dcm / "manifest.parquet").set_index("path")
    assert len(m) == len(names) + 3
    cine = m.loc["extra/cine.dcm"]
    assert cine.status == "error" and "multi-frame" in cine.error and cine.sop_uid
    ok = m[m.status == "ok"]
    assert (ok.bit_depth == 16).all()
    first = ok.loc[names[0]]  # read without extension or preamble
    assert first.patient_id == "P0" and first.view == "PA" and first.modality == "DX"
    assert list(first.pixel_spacing) == [0.139, 0.139]
    # outputs keep the 12-bit stored levels (inverted), not the window
    lungs = cv2.imread(str(dcm / first.lungs_path), cv2.IMREAD_UNCHANGED)
    mask = cv2.imread(str(dcm / first.mask_path), cv2.IMREAD_UNCHANGED) > 0
    gray = decode_image((src / names[0]).read_bytes(), dicom=True).pixels
    assert lungs.dtype == np.uint16
    np.testing.assert_array_equal(lungs, np.where(mask, gray, 0))
    assert "not a radiograph (modality CT" in ok.loc["extra/ct.dcm"].qc_reason
    assert "lateral view (view LL)" in ok.loc["extra/lateral.dcm"].qc_reason
    assert ok.loc[[f"{n}.dcm" for n in names[1:]] + [names[0]]].qc_pass.all()


@pytest.mark.slow
def test_decoder_warnings_are_counted_not_printed(tmp_path, example_images, capfd):
    src = tmp_path / "in"
    for i in range(3):
        write_dicom(src / f"w{i}.dcm", cxr_like(seed=i), StudyInstanceUID="1.2.bad!")
    assert main(["segment", str(src), "-o", str(tmp_path / "out"), "-q"]) == 0
    err = capfd.readouterr().err
    assert "UserWarning" not in err and "valuerep.py" not in err
    counted = [line for line in err.splitlines() if "warning(s) during the run were counted" in line]
    assert len(counted) == 1 and "Invalid value for VR UI: '1.2.bad!'" in counted[0]


@pytest.mark.slow
def test_variants_from_a_dicom_run_rebuilds_the_same_outputs(dicom_runs, tmp_path):
    dcm = dicom_runs["dcm"]
    out = tmp_path / "variants"
    assert main(["variants", str(dcm / "manifest.parquet"), "-o", str(out), "-q"]) == 1  # the multi-frame row again
    seg = pq.read_table(dcm / "manifest.parquet").to_pandas().set_index("path")
    var = pq.read_table(out / "manifest.parquet").to_pandas().set_index("path")
    for path, row in seg[seg.status == "ok"].iterrows():
        assert (out / var.loc[path].lungs_path).read_bytes() == (dcm / row.lungs_path).read_bytes()
        assert var.loc[path].sop_uid == row.sop_uid and var.loc[path].patient_id == row.patient_id
    assert "lateral view" in var.loc["extra/lateral.dcm"].qc_reason


def test_labels_fill_view_where_the_image_has_none(tmp_path, random_weights):
    src = tmp_path / "in"
    write_png(src / "side.png", cxr_like(seed=1))
    write_png(src / "front.png", cxr_like(seed=2))
    write_dicom(src / "d.dcm", cxr_like(seed=3), PatientID="HDR")
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,view,modality,source\nside.png,covid,L,X-ray,a\nfront.png,negative,PA,X-ray,b\n"
                      "d.dcm,covid,LL,,c\n")
    assert main(["segment", str(src), "-o", str(tmp_path / "out"), "-w", str(random_weights), "-q",
                 "--labels", str(labels)]) == 0
    m = pd.read_parquet(tmp_path / "out" / "manifest.parquet").set_index("path")
    assert m.loc["side.png", "view"] == "L" and "lateral view" in (m.loc["side.png", "qc_reason"] or "")
    assert m.loc["d.dcm", "view"] == "PA"  # the header's ViewPosition wins over the label file's
    assert m.loc["d.dcm", "patient_id"] == "HDR" and pd.isna(m.loc["front.png", "patient_id"])
    assert m.source.to_dict() == {"d.dcm": "c", "front.png": "b", "side.png": "a"}


@pytest.mark.parametrize("photometric, slope, intercept, bits", [
    ("MONOCHROME2", "1", "0", 12), ("MONOCHROME2", "1", "-1024", 12), ("MONOCHROME1", "2", "-3000", 14),
    ("MONOCHROME2", "1", "0", 8), ("MONOCHROME1", "1", "100", 16),
])
def test_integer_rescale_path_equals_the_float_path(tmp_path, monkeypatch, photometric, slope, intercept, bits):
    """Most CR/DX rescale by integers: their pixels are computed without float64 copies (a 10000 px DICOM
    peaked at 1.2 GB instead of 2.9-3.7 GB), and must equal what the float path gives, pixel for pixel."""
    from lungmask_kit import dicom

    rng = np.random.default_rng(bits)
    stored = rng.integers(0, 1 << bits, (40, 30), dtype=np.uint16 if bits > 8 else np.uint8)
    path = write_dicom(tmp_path / "a.dcm", stored, photometric, bits, RescaleSlope=slope, RescaleIntercept=intercept)
    fast = read_decoded(path).pixels
    monkeypatch.setattr(dicom, "_integer_rescale", lambda ds: None)
    slow = read_decoded(path).pixels
    assert fast.dtype == slow.dtype
    np.testing.assert_array_equal(fast, slow)

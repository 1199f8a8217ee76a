"""DICOM Segmentation objects of lungkit's masks (highdicom; extra `lungkit[dicom]`): what PACS viewers (OHIF,
3D Slicer) and annotation tools read. One SEG per DICOM input: the same Study, a new Series, referencing the source
image's SOP Instance; segment 1 the patient's right lung, segment 2 the left lung, segment 3 the heart where the
model draws it (it may overlap the lungs: each segment is its own binary frame); algorithm identification
lungkit + the model's name and version. Nothing about the patient is invented: the patient and study attributes
are the source's own (highdicom copies them). Shape contract: `right`, `left` (and `heart`) are (H, W) bool at
the source's Rows x Columns, the lungs disjoint; inputs are never mutated."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from lungmask_kit import __version__
from lungmask_kit.errors import LungkitError

SERIES_NUMBER = 9901  # a series number viewers sort after the source's usual ones; the description says what it is
_ANATOMY = ("123037004", "SCT", "Anatomical Structure")
_LUNGS = (("3341006", "SCT", "Right lung"), ("44029006", "SCT", "Left lung"))
_HEART = ("80891009", "SCT", "Heart")


def _highdicom():
    try:
        import highdicom
    except ImportError:
        raise LungkitError("--dicom-seg needs highdicom: pip install 'lungkit[dicom]'") from None
    return highdicom


def check_available() -> None:
    """Fail at the start of a run, not at its first DICOM."""
    _highdicom()


# Type 2 attributes a SEG copies from its source: present in a conformant image, perhaps empty; where a source
# lacks one it is added empty (no value is invented)
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


def _with_empty_type2(source: pydicom.Dataset) -> pydicom.Dataset:
    missing = [k for k in _TYPE2 if k not in source]
    if not missing:
        return source
    copy = pydicom.Dataset(source)
    copy.file_meta = getattr(source, "file_meta", pydicom.dataset.FileMetaDataset())
    for keyword in missing:
        setattr(copy, keyword, "")
    return copy


# what a SEG references of its source: without any of them there is no valid SEG to write
REFERENCED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")


def missing_uids(source: pydicom.Dataset) -> list[str]:
    """The UIDs a SEG must reference that the source lacks (empty: a SEG can be written)."""
    return [k for k in REFERENCED_UIDS if not str(source.get(k, "") or "").strip()]


def _without_unreadable_pixel_measures(source: pydicom.Dataset) -> pydicom.Dataset:
    """A projection radiograph's PixelSpacing without a SliceThickness makes highdicom write a Pixel Measures
    item its own reader (`highdicom.seg.segread`) refuses; the macro is optional for a 2-D SEG (dciodvfy finds no
    error without it), so the SEG is written from a copy without PixelSpacing (the source keeps it)."""
    if "PixelSpacing" not in source or "SliceThickness" in source:
        return source
    copy = pydicom.Dataset(source)
    copy.file_meta = getattr(source, "file_meta", pydicom.dataset.FileMetaDataset())
    del copy.PixelSpacing
    return copy


def segmentation(source: pydicom.Dataset, right: np.ndarray, left: np.ndarray, model_name: str, model_version: str,
                 convention: str, heart: np.ndarray | None = None) -> bytes:
    """The DICOM Segmentation (BINARY) of one image's two lungs (and heart), as Part 10 bytes."""
    hd = _highdicom()

    if right.shape != (source.Rows, source.Columns) or left.shape != right.shape or \
            (heart is not None and heart.shape != right.shape):
        raise ValueError(f"mask {right.shape} does not fit the DICOM's {source.Rows}x{source.Columns}")
    source = _with_empty_type2(_without_unreadable_pixel_measures(source))
    if heart is None:
        pixels = np.zeros(right.shape, np.uint8)  # a label map: the lungs are disjoint
        pixels[right], pixels[left] = 1, 2
    else:  # one binary plane per segment (frame, rows, columns, segment): the heart may overlap a lung
        pixels = np.stack([right, left, heart], axis=-1)[None].astype(np.uint8)
    algorithm = hd.AlgorithmIdentificationSequence(name="lungkit", version=f"{__version__} / {model_name} {model_version}",
                                                   family=Code("123110", "DCM", "Artificial Intelligence"))
    described = [(code, f"{code[2]} ({convention} convention)") for code in _LUNGS]
    if heart is not None:
        described.append((_HEART, "Heart"))
    segments = [hd.seg.SegmentDescription(
        segment_number=k, segment_label=label,
        segmented_property_category=Code(*_ANATOMY), segmented_property_type=Code(*code),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
    ) for k, (code, label) in enumerate(described, 1)]
    seg = hd.seg.Segmentation(
        source_images=[source], pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=generate_uid(), series_number=SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="lungkit",
        manufacturer_model_name=model_name, software_versions=__version__, device_serial_number="n/a",
        series_description="lungkit lung segmentation", omit_empty_frames=False,
    )
    if "PatientOrientation" not in seg:  # Type 2C for a projection image's SEG: the source's, else present but empty
        seg.PatientOrientation = source.get("PatientOrientation", "")
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()

"""The units of `lungkit segment` that every engine shares: the settings key that decides resume, the reader of one
image (read, hash, decode, prepare for the model) and the writer of one image's outputs (post-process, score,
write the mask and the variants). Plain data, so Ray ships them to its tasks; no orchestration here."""

from __future__ import annotations

import errno
import hashlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np

from lungmask_kit import defaults, dicom, dicom_seg
from lungmask_kit.anatomy.heart import finish_heart, heart_at_native, heart_fields, native_columns, thorax_fields
from lungmask_kit.anatomy.lungs import lung_columns, lungs_from_probability
from lungmask_kit.derive import derive_variants
from lungmask_kit.discovery import output_path_problem, wants_dicom
from lungmask_kit.engines.local import Item
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import InputReadError, atomic_write_bytes, digest
from lungmask_kit.imaging import (
    ImageDecodeError,
    check_encoded,
    decode_image,
    encode_png,
    prepare_input,
    read_checked,
    read_input,
)
from lungmask_kit.manifest import SegmentRow
from lungmask_kit.postprocess import PostprocessSettings, clean_mask, lung_sides

if TYPE_CHECKING:
    from lungmask_kit.models.modeling import ModelConfig
    from lungmask_kit.quality import QualityModel

OUTPUT_DIRS = {"mask": "masks", "lungs": "lungs", "nolungs": "nolungs"}
HEART_DIR = "heart"  # heart masks, for a model with a heart output
_ALL_DIRS = {**OUTPUT_DIRS, "heart": HEART_DIR}
DICOM_SEG_DIR = "dicom-seg"  # segment --dicom-seg
# Bump when the bytes written for the same input and settings change.
OUTPUT_FORMAT = 4  # 2: quality columns (ood_score, est_dice); 3: convention, right and left lung columns; 4: heart


def manifest_path(rel: str) -> str:
    """File names that are not valid UTF-8 are stored with backslash escapes (Parquet strings are UTF-8)."""
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def settings_key(weights_sha256: str, config: ModelConfig, post: PostprocessSettings, tta: bool = False,
                 batch_size: int = defaults.BATCH_SIZE, device_type: str = "cpu", gpu_decode: bool = False,
                 convention: str = defaults.CONVENTION, precision: str = "fp32", dicom_seg: bool = False,
                 heart_png: bool = False, runtime: str = "torch") -> str:
    """Identifies everything that changes the written files and quality columns; resume redoes images whose
    key differs. The batch size, the device, the runtime and the precision are in it: a model batch of another
    size or another runtime moves probabilities at the 1e-6 level, bf16 or fp16 more, and either can move a mask
    pixel. QC thresholds are not: they re-flag
    at the end of every run without re-segmenting."""
    payload = {
        "weights": weights_sha256,
        "input": [config.input_size, list(config.mean), list(config.std), config.in_channels],
        "post": post.as_dict(),
        "format": OUTPUT_FORMAT,
        "quality": config.quality and {k: v for k, v in config.quality.items() if k not in ("max_ood_score", "min_est_dice", "report")},
        "tta": tta,
        "batch": batch_size,
        "device": device_type + ("+nvjpeg" if gpu_decode else ""),
        "convention": convention,
        "precision": precision,
        "backend": runtime,
    }
    if dicom_seg:  # only when asked, so the keys of runs without it stay what they were
        payload["dicom_seg"] = True
    if heart_png:
        payload["heart_png"] = True
    return digest(payload)


class OutputWriteError(LungkitError):
    """The output folder took no more files (full, read-only): the run stops."""


@dataclass(frozen=True)
class ImagePrediction:
    """The model's output for one image: lung probability (S, S), the encoder's pooled features (the input gate's
    view of the image), with --tta the probability of the mirrored pass, and the other outputs the run reads
    (`inference.BatchPrediction.extra`: "heart", and "jsrt" for the CTR when the run's lungs are v7)."""

    probability: np.ndarray
    pooled: np.ndarray
    flipped: np.ndarray | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One image of the run: its path under the input folder, its output file name, and the sha256 it had when
    an earlier run finished it with the same settings (None if none did)."""

    rel: str
    out_name: str
    done_sha256: str | None = None


def output_rel(kind: str, task: Task) -> str:
    """Where an image's mask / lungs / nolungs / heart file goes, relative to OUT."""
    return f"{_ALL_DIRS[kind]}/{manifest_path(task.out_name)}"


@dataclass(frozen=True)
class DeviceJpeg:
    """A gray JPEG left undecoded for nvJPEG (decoded on the GPU with its batch)."""

    data: bytes


def _footprint(height: int, width: int, itemsize: int) -> int:
    # the image plus the mask and the two variants made from it
    return height * width * (3 * itemsize + 1)


@dataclass
class ImageReader:
    """Reads, hashes, decodes and prepares one image for the model; never raises for bad input (the row says
    what went wrong). Plain data, so Ray ships it to its tasks."""

    root: Path
    out: Path
    key: str
    config: ModelConfig  # input size, mean, std, channels
    dicom: bool = False
    prepare_on_host: bool = True  # False: the engine's device resizes and normalises
    jpeg_on_device: bool = False  # leave gray JPEGs undecoded for nvJPEG
    heart: bool = False  # heart PNGs are written (--heart-png): a finished image has one too

    def read(self, task: Task) -> Item:
        try:
            return self._read(task)
        except Exception as err:  # an unforeseen failure costs one image, never the batch
            row = SegmentRow(path=manifest_path(task.rel), status="error", settings_key=self.key,
                             error=f"unexpected error while reading: {type(err).__name__}: {err}")
            return Item(task, row)

    def _read(self, task: Task) -> Item:
        row = SegmentRow(path=manifest_path(task.rel), status="error", settings_key=self.key)
        item = Item(task, row)
        problem = output_path_problem(self.out, output_rel("lungs", task))
        if problem:
            row["error"] = problem
            return item
        try:
            data = read_checked(self.root / task.rel)
        except InputReadError as err:
            row["error"] = str(err)
            return item
        sha = hashlib.sha256(data).hexdigest()
        row.update(sha256=sha, file_bytes=len(data))
        kinds = [*OUTPUT_DIRS, "heart"] if self.heart else list(OUTPUT_DIRS)
        if task.done_sha256 == sha and all((self.out / output_rel(k, task)).is_file() for k in kinds):
            row["status"] = "skipped"
            return item
        if self.jpeg_on_device:
            size = _device_jpeg_size(data)
            if size is not None:
                item.model_input, item.held = DeviceJpeg(data), _footprint(size[1], size[0], 1)
                return item
        try:
            decoded = decode_image(data, dicom=wants_dicom(task.rel, self.dicom))
        except ImageDecodeError as err:
            row.update(err.header, error=str(err))
            return item
        self.accept(item, decoded)
        return item

    def accept(self, item: Item, decoded) -> None:
        """Fill the row from a decoded image and make the model input (on the host unless the device does)."""
        h, w = decoded.pixels.shape
        item.row.update(decoded.header, width=w, height=h, bit_depth=decoded.bit_depth,
                        source_channels=decoded.source_channels)
        view = decoded.model_view
        if self.prepare_on_host:
            c = self.config
            view = prepare_input(view, c.input_size, c.mean, c.std, c.in_channels)
        item.model_input = view
        item.pixels = decoded.pixels
        item.held = _footprint(h, w, decoded.pixels.itemsize)

    def pixels(self, task: Task, sha256: str) -> np.ndarray:
        """The kept pixels of an image read before, which must still have the content it had then (the Ray
        engine's write tasks decode it again rather than ship it between machines)."""
        return read_input(self.root / task.rel, wants_dicom(task.rel, self.dicom), expect_sha256=sha256)[1].pixels


def _device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG for nvJPEG, after the checks the host decoder makes (size, completeness)."""
    from lungmask_kit.accel import gray_jpeg_size  # torch: only the CUDA path comes here

    size = gray_jpeg_size(data)
    if size is None:
        return None  # not for nvJPEG: the host decodes it
    try:
        check_encoded(data)
    except ImageDecodeError:
        return None  # the host decoder says what is wrong
    return size


@dataclass(frozen=True)
class DicomSegOutput:
    """`segment --dicom-seg`: where the DICOM inputs are (their headers are read again) and what made the masks."""

    input_root: Path
    model_name: str
    model_version: str
    dicom: bool = False  # --dicom: files without an extension are DICOM too


@dataclass
class OutputWriter:
    """Post-processes one prediction, scores its quality and writes the mask and the variants atomically;
    returns the finished row. Plain data (the quality model is numpy), so Ray ships it to its workers."""

    out: Path
    post: PostprocessSettings
    quality: QualityModel | None
    convention: str = defaults.CONVENTION
    dicom_seg: DicomSegOutput | None = None
    heart_png: bool = False  # also OUT/heart/ PNGs (the manifest's heart_rle is written either way)

    def write(self, task: Task, row: SegmentRow, pixels: np.ndarray, prediction: ImagePrediction) -> SegmentRow:
        probability, pooled, flipped = prediction.probability, prediction.pooled, prediction.flipped
        small, lungs = lungs_from_probability(probability, self.post, pixels.shape)
        if self.quality is not None:
            flipped_mask = None if flipped is None else clean_mask(flipped, self.post)
            row.update(self.quality.assess(probability, small, pooled, flipped_mask, self.post).as_row())
        row.update(lung_columns(lungs, row.get("pixel_spacing")), convention=self.convention)
        images = {"mask": lungs.mask.view(np.uint8) * 255, **derive_variants(pixels, lungs.mask)}
        heart = None
        if "heart" in prediction.extra:
            heart = self._finish_heart(row, small, prediction, pixels.shape)
            if self.heart_png:  # a PNG per image costs the writers about 10% of their time at 2000 px
                images["heart"] = heart.view(np.uint8) * 255
                row["heart_path"] = output_rel("heart", task)
        paths = {kind: output_rel(kind, task) for kind in images}
        try:
            for kind, image in images.items():
                atomic_write_bytes(self.out / paths[kind], encode_png(image), fsync=False)
        except OSError as err:
            raise OutputWriteError(f"cannot write outputs to {self.out}: {err.strerror or err}"
                                    + (" (disk full)" if err.errno == errno.ENOSPC else "")) from err
        row.update(mask_path=paths["mask"], lungs_path=paths["lungs"], nolungs_path=paths["nolungs"], status="ok",
                   error=None)
        if self.dicom_seg is not None and wants_dicom(task.rel, self.dicom_seg.dicom):
            row["dicom_seg_path"] = self._write_dicom_seg(task, lungs.right, lungs.left, heart)
        return row

    def _finish_heart(self, row: SegmentRow, lungs_small: np.ndarray, prediction: ImagePrediction,
                      shape: tuple[int, int]) -> np.ndarray:
        """The heart mask at native size, its fields and the two widths of the CTR (on the visible lungs: the
        run's own lungs in the jsrt convention, the model's jsrt output otherwise). The heart is kept as the
        network draws it, overlap with the lungs included: the publisher's own jsrt lung and heart masks
        overlap too (cxr-heart: 4.5% of the heart's area on average)."""
        small_heart = finish_heart(prediction.extra["heart"], self.post.threshold)
        native = heart_at_native(small_heart, shape)
        row.update(heart_fields(native, row.get("pixel_spacing")))
        visible = lungs_small if self.convention == "jsrt" else None
        if visible is None and "jsrt" in prediction.extra:
            visible = clean_mask(prediction.extra["jsrt"], self.post)
        if visible is None:
            row.update(thorax_fields(None, None))
        else:
            row.update(thorax_fields(native_columns(visible, shape[1]), lung_sides(visible), small_heart))
        if row["heart_width_px"] is None:
            row["ctr_null_reason"] = "no heart found"
        return native.mask

    def _write_dicom_seg(self, task: Task, right: np.ndarray, left: np.ndarray, heart: np.ndarray | None) -> str | None:
        """The image's DICOM Segmentation under OUT/dicom-seg/ (same name as its PNGs, .dcm); None where the source
        lacks a UID a SEG must reference (the run's summary counts them)."""
        source = dicom.read_dataset(read_checked(self.dicom_seg.input_root / task.rel), force=True, header_only=True)
        if dicom_seg.missing_uids(source):
            return None
        payload = dicom_seg.segmentation(source, right, left, self.dicom_seg.model_name, self.dicom_seg.model_version,
                                         self.convention, heart)
        rel = f"{DICOM_SEG_DIR}/{PurePosixPath(manifest_path(task.out_name)).with_suffix('.dcm')}"
        try:
            atomic_write_bytes(self.out / rel, payload, fsync=False)
        except OSError as err:
            raise OutputWriteError(f"cannot write outputs to {self.out}: {err.strerror or err}") from err
        return rel

    @staticmethod
    def failed(row: SegmentRow, err: Exception) -> SegmentRow:
        """The row of an image whose post-processing raised unexpectedly (a bug costs the image, not the run)."""
        return row | {"status": "error", "error": f"post-processing failed: {type(err).__name__}: {err}"}



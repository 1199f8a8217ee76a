from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cxr-sample"
SHARED = Path(os.environ.get("LUNGKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared(name: str) -> Path:
    """A folder of the shared real data, or skip (a user's fresh clone has only what the repo bundles)."""
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"shared data {path} not present")
    return path


def pytest_configure(config):
    """LUNGKIT_TEST_CPU_WITHOUT_BF16=1 runs the suite as on a CPU without bf16 units (where `--runtime auto` picks
    OpenVINO): in this process, and through cpu_without_bf16/sitecustomize.py in the CLI subprocesses."""
    if os.environ.get("LUNGKIT_TEST_CPU_WITHOUT_BF16") == "1":
        import lungmask_kit.runtime

        lungmask_kit.runtime.cpu_has_bf16 = lambda: False
        here = str(Path(__file__).parent / "cpu_without_bf16")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The runs' caches (OpenVINO's converted models) in the session's temporary folder, not the user's home;
    subprocesses inherit it."""
    os.environ["LUNGKIT_CACHE_DIR"] = str(tmp_path_factory.mktemp("lungkit-cache"))


@pytest.fixture(scope="session")
def example_images() -> Path:
    return EXAMPLE / "images"


@pytest.fixture(scope="session")
def example_masks() -> Path:
    return EXAMPLE / "masks"


@pytest.fixture(scope="session")
def random_weights(tmp_path_factory) -> Path:
    """An FPN-DenseNet121 with random weights in the shipped format (safetensors + JSON config)."""
    import torch

    from lungmask_kit.models import ModelConfig, build_model, save_model

    torch.manual_seed(0)
    cfg = ModelConfig(name="random-test-model", mean=[0.5], std=[0.25])
    return save_model(build_model(cfg), cfg, tmp_path_factory.mktemp("weights") / "random.safetensors")


def cxr_like(h: int = 320, w: int = 288, seed: int = 0, dtype=np.uint8) -> np.ndarray:
    """A synthetic chest-X-ray-like image: bright body, two dark lung fields, noise."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w), 0.75, np.float32)
    yy, xx = np.mgrid[0:h, 0:w]
    for cx in (0.3 * w, 0.7 * w):
        img[((xx - cx) / (0.16 * w)) ** 2 + ((yy - 0.5 * h) / (0.32 * h)) ** 2 < 1] = 0.25
    img += rng.normal(0, 0.03, img.shape).astype(np.float32)
    scale = 65535 if dtype == np.uint16 else 255
    return (np.clip(img, 0, 1) * scale).astype(dtype)


def image_mask_pairs(root: Path, n: int, h: int = 900, w: int = 800) -> tuple[Path, Path]:
    """root/images and root/masks with n synthetic CXRs and their lung masks (the dark fields): enough work
    for a variants run to be caught mid-way."""
    for i in range(n):
        img = cxr_like(h, w, seed=i)
        write_png(root / "images" / f"v{i:02d}.png", img)
        write_png(root / "masks" / f"v{i:02d}.png", (img < 110).astype(np.uint8) * 255)
    return root / "images", root / "masks"


def write_png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), pixels)
    return path


@pytest.fixture
def small_corpus(tmp_path, example_images) -> Path:
    """Three real example images (the smaller ones) copied into a scratch input folder."""
    src = tmp_path / "in"
    src.mkdir()
    for name in ("ieee_thnov10p5641g006-c.png", "ieee_41182_2020_203_Fig3_HTML.png", "ieee_b39f5cf9.png"):
        shutil.copy(example_images / name, src / name)
    return src


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                transfer_syntax=None, preamble: bool = True, **elements) -> Path:
    """A DX radiograph as a DICOM file written by pydicom: `pixels` are the stored values; `elements` add or
    override header elements (Modality="CT", WindowCenter=..., RescaleSlope=...); `transfer_syntax` compresses
    (pydicom encodes JPEG 2000 with pylibjpeg-openjpeg, JPEG-LS with pyjpegls, RLE itself)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.ViewPosition = "DX", "PAT-1", "PA"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImagerPixelSpacing = [0.139, 0.139]
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for name, value in elements.items():
        setattr(ds, name, value)
    if transfer_syntax is not None:
        ds.compress(transfer_syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=preamble)
    return path


def write_calibration_pairs(folder: Path, n: int = 24) -> Path:
    """`n` image + mask pairs under folder/images and folder/masks: the bundled example's 8 again, mirrored and
    shifted, enough for a 10-image validation split (calibrate refuses fewer)."""
    sources = sorted((EXAMPLE / "images").iterdir())
    for i in range(n):
        src = sources[i % 8]
        image = cv2.imread(str(src), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(EXAMPLE / "masks" / src.name), cv2.IMREAD_UNCHANGED)
        if i >= 8:
            image, mask = cv2.flip(image, 1), cv2.flip(mask, 1)
        if i >= 16:
            image, mask = np.roll(image, 7, axis=0), np.roll(mask, 7, axis=0)
        write_png(folder / "images" / f"{i:02d}-{src.name}", image)
        write_png(folder / "masks" / f"{i:02d}-{src.name}", mask)
    return folder

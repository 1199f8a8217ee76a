"""Host work moved onto the accelerator: resize and normalise as torch ops, JPEG decoding with nvJPEG.

On a GPU the host cannot feed the model fast enough when it decodes and resizes every image itself (one node
is decode-bound), so with CUDA the native image goes to the device (pinned memory, non-blocking copy) and is
resized and normalised there; grayscale JPEGs are decoded there too. The same functions run on the CPU in
the tests. Shape contract: inputs (H, W) uint8/uint16 arrays or tensors; outputs (N, C, S, S) float32.
"""

from __future__ import annotations

import struct
import warnings

import numpy as np
import torch


def to_device(pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """An (H, W) image on `device`: through pinned memory with a non-blocking copy when that is a GPU."""
    if isinstance(pixels, torch.Tensor):
        return pixels.to(device, non_blocking=True)
    if pixels.dtype == np.uint16:  # torch's uint16 has only barebones kernels (on CUDA too): go as int32
        pixels = pixels.astype(np.int32)
    t = torch.from_numpy(np.ascontiguousarray(pixels))
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def prepare_on_device(images: list, size: int, mean, std, in_channels: int, device: torch.device) -> torch.Tensor:
    """Native-size (H, W) images -> (N, C, size, size) normalised model input on `device`, as
    `imaging.prepare_input` does on the host: area resize, 8-bit / 255 or 16-bit stretched by its own min/max
    (after the resize, like the host path), then (x - mean) / std."""
    out = torch.empty((len(images), in_channels, size, size), dtype=torch.float32, device=device)
    m = torch.tensor(mean, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).reshape(-1, 1, 1)
    for i, image in enumerate(images):
        t = to_device(image, device)
        eight_bit = t.dtype == torch.uint8
        h, w = t.shape[-2:]
        # OpenCV's INTER_AREA as two matrix products (exact fractional pixel weights), rounded to integers as
        # cv2.resize returns them; F.interpolate's "area" (adaptive pooling) differs by up to 30 levels at edges
        x = torch.round(area_weights(h, size, device) @ t.reshape(h, w).float() @ area_weights(w, size, device).T)
        if eight_bit:
            x = x * (1.0 / 255.0)
        else:
            lo, hi = x.min(), x.max()
            x = (x - lo) / (hi - lo).clamp_min(1.0)
        out[i] = (x.expand(in_channels, size, size) - m) / s
    return out


_weights_cache: dict = {}


def area_weights(n: int, size: int, device: torch.device) -> torch.Tensor:
    """(size, n) matrix averaging n pixels into `size` with each source pixel weighted by its overlap (box
    filter at the exact fractional scale, as cv2.INTER_AREA does when shrinking; when enlarging, where OpenCV
    interpolates, it stays a box: images under the model's input size are rare in a CXR corpus)."""
    key = (n, size, str(device))
    if key not in _weights_cache:
        edges = np.arange(size + 1, dtype=np.float64) * (n / size)
        src = np.arange(n + 1, dtype=np.float64)
        lo = np.maximum(edges[:-1, None], src[None, :-1])
        hi = np.minimum(edges[1:, None], src[None, 1:])
        weights = np.clip(hi - lo, 0, None) / (n / size)
        _weights_cache[key] = torch.from_numpy(weights.astype(np.float32)).to(device)
    return _weights_cache[key]


def gray_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a baseline or progressive 8-bit one-component JPEG without EXIF, the kind nvJPEG
    decodes to exactly the host's pixels; None for anything else (decoded on the host)."""
    if data[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 9 < len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        if marker == 0xE1 and data[i + 4:i + 8] == b"Exif":
            return None  # an orientation tag would have to be applied
        if marker in (0xC0, 0xC1, 0xC2):
            precision, h, w, components = data[i + 4], *struct.unpack(">HH", data[i + 5:i + 9]), data[i + 9]
            return (w, h) if precision == 8 and components == 1 else None
        if 0xC3 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return None  # lossless, hierarchical or arithmetic coding
        i += 2 + length
    return None


def decode_jpegs(datas: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """Gray JPEG bytes -> (H, W) uint8 tensors on `device` (nvJPEG on a GPU, batched); None for each image that
    did not decode there (the caller decodes it on the host and reports what is wrong)."""

    # torchvision 0.29 marks its codecs deprecated in favour of TorchCodec on every call; they work, and a
    # warning per batch would only be counted into the run's summary line
    warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas]
    try:
        return [t[0] for t in decode_jpeg(tensors, mode=ImageReadMode.GRAY, device=device)]
    except RuntimeError:  # one bad image fails the batch: find it
        out: list[torch.Tensor | None] = []
        for t in tensors:
            try:
                out.append(decode_jpeg(t, mode=ImageReadMode.GRAY, device=device)[0])
            except RuntimeError:
                out.append(None)
        return out

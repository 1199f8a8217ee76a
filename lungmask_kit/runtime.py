"""Process-level settings for fast CPU/GPU work: allocator, threads, device and precision choice (decoder
warnings are counted in `decoder_warnings`)."""

from __future__ import annotations

import ctypes
import os
import sys
from typing import TYPE_CHECKING

from lungmask_kit.errors import LungkitError

if TYPE_CHECKING:
    import torch

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_malloc_tuned = False


def tune_malloc() -> bool:
    """Stop glibc malloc from mmap/munmap-ing big activations on every op (halved batched CPU speed here).

    Harmless where tcmalloc/jemalloc is preloaded or libc is not glibc; returns whether it applied.
    """
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux"):
        return _malloc_tuned
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    _malloc_tuned = ok
    return ok


def passive_openmp_threads() -> bool:
    """Let torch's OpenMP threads sleep, not spin, between operators (OMP_WAIT_POLICY=PASSIVE) unless the user
    chose a policy; returns whether it applies. Only before torch is imported: libgomp reads it when it loads.

    For `segment`, where decode and writer threads share the cores with the model: measured on 2 Zen 4 cores,
    end to end 10.16 against 8.99 img/s in bf16 (5 alternated process pairs), 7.39 against 6.94 in fp32; the
    model alone is 5-8% slower, so training and calibration keep the default."""
    if "torch" in sys.modules or os.environ.get("OMP_WAIT_POLICY"):
        return False
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, with a clear error when CUDA is absent."""
    import torch  # here, not at the top: report, publish and the CLI use this module without torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise LungkitError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from err
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise LungkitError(f"device {device!r} requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LungkitError(f"device {device!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif dev.type != "cpu":
        raise LungkitError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return dev


def prepare_device(device: str | torch.device = "auto") -> torch.device:
    """What every command does before its model runs: resolve the device, set threads, tune malloc on the CPU."""
    import torch

    dev = device if isinstance(device, torch.device) else resolve_device(device)
    configure_threads()
    if dev.type == "cpu":
        tune_malloc()
    return dev


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX): there bf16 autocast is fast; elsewhere
    oneDNN emulates it and runs slower than fp32."""
    import torch

    cpu = torch.cpu
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def autocast_dtype(precision: str, device: torch.device, cuda: torch.dtype | None = None) -> torch.dtype | None:
    """The autocast dtype a precision setting means on a device (None: fp32). `auto`: on CUDA `cuda` (fp16
    for inference, bf16 for training), on a CPU with bf16 units bf16 (measured here: masks agree with fp32 at
    Dice 0.9997 mean, 0.998 worst; est_dice within 0.0003, ood_score within 0.003), fp32 elsewhere (oneDNN
    emulates bf16 there, slower than fp32). `bf16` where the device cannot is refused."""
    import torch

    if precision not in ("auto", "fp32", "bf16"):
        raise LungkitError(f"unknown precision {precision!r} (use auto, fp32 or bf16)")
    capable = device.type == "cuda" or cpu_has_bf16()
    if precision == "bf16" and not capable:
        raise LungkitError("--precision bf16: this CPU has no bf16 units (AVX512-BF16 or AMX); use fp32")
    if precision == "fp32" or not capable:
        return None
    if precision == "auto" and device.type == "cuda":
        return cuda or torch.float16
    return torch.bfloat16


def training_autocast(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a training step: bf16 on CUDA and on a CPU with bf16 units (1.65x per step here,
    AVX512-BF16), fp32 elsewhere."""
    import torch

    return autocast_dtype(precision, device, cuda=torch.bfloat16)


def precision_name(dtype: torch.dtype | None) -> str:
    import torch

    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def configure_threads(torch_threads: int | None = None) -> int:
    """Set torch's intra-op threads (default: all usable cores) and keep OpenCV and BLAS single-threaded
    per call.

    Must run in the parent process: cv2.setNumThreads() inside a forked worker hung a run here. BLAS is
    limited because the per-image numpy products of the quality model are tiny: OpenBLAS threads spinning
    after each one took the cores from torch and OpenCV (end-to-end -16% on 2 cores before this limit).
    """
    import cv2
    import torch

    n = torch_threads or available_cores()
    torch.set_num_threads(n)
    cv2.setNumThreads(1)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1, user_api="blas")
    except ImportError:  # threadpoolctl comes with scikit-learn; without it BLAS keeps its default
        pass
    return n


def cpu_load_warning(threshold: float = 0.5) -> str | None:
    """A warning when other processes already keep the cores busy (2-thread inference ran 10-25x slower)."""
    try:
        load1 = os.getloadavg()[0]
    except OSError:
        return None
    cores = available_cores()
    if load1 > cores * (1 + threshold):
        return (
            f"the machine is busy (1-minute load {load1:.1f} on {cores} cores): "
            "throughput will be much lower than usual"
        )
    return None

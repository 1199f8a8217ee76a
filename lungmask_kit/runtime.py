"""Process-level settings for fast CPU/GPU work: allocator, threads, device choice."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from lungmask_kit.errors import LungkitError

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


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, with a clear error when CUDA is absent."""
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

"""Process-level settings for fast CPU/GPU work: allocator, threads, device choice."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading
import warnings
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


class WarningTally(logging.Handler):
    """While active, counts warnings instead of printing each: Python warnings from any thread, the records of
    `loggers`, and the lines C decoders write straight to file descriptor 2 (libjpeg's "Corrupt JPEG data",
    libpng's and libtiff's warnings). A corpus of odd files would otherwise print a line per image. Keeps the
    first message, for the run's summary; everything else written to stderr passes through at once."""

    def __init__(self, loggers: tuple[str, ...] = ("pydicom",), c_stderr: bool = True):
        super().__init__(logging.WARNING)
        self.count = 0
        self.first: str | None = None
        self._names = loggers
        self._c_stderr = c_stderr
        self._tally_lock = threading.Lock()

    def add(self, message: str, n: int = 1) -> None:
        with self._tally_lock:
            self.count += n
            if self.first is None:
                line = message.strip().splitlines()[0] if message.strip() else message
                self.first = line if len(line) <= 160 else line[:157] + "..."

    def emit(self, record: logging.LogRecord) -> None:
        self.add(f"{record.name}: {record.getMessage()}")

    def _show(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.add(f"{category.__name__}: {message}")

    def __enter__(self) -> "WarningTally":
        self._saved = warnings.catch_warnings()
        self._saved.__enter__()
        warnings.simplefilter("always")  # count every one, not the first per code location
        for hidden in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.filterwarnings("ignore", category=hidden)  # what Python hides by default stays hidden
        warnings.showwarning = self._show
        self._loggers = [(logging.getLogger(n), logging.getLogger(n).propagate) for n in self._names]
        for logger, _ in self._loggers:
            logger.addHandler(self)
            logger.propagate = False
        self._fd_filter = _DecoderLineFilter(self).start() if self._c_stderr else None
        return self

    def __exit__(self, *exc) -> None:
        if self._fd_filter is not None:
            self._fd_filter.stop()
        for logger, propagate in self._loggers:
            logger.removeHandler(self)
            logger.propagate = propagate
        self._saved.__exit__(*exc)

    def summary(self) -> str | None:
        if not self.count:
            return None
        return f"{self.count} warning(s) during the run were counted, not printed; the first: {self.first}"


class _DecoderLineFilter:
    """Puts a pipe on file descriptor 2 and a thread behind it: lines that C decoders print (they write to the
    descriptor, past Python) are counted into the tally; all other output -- the progress bar, tracebacks --
    is copied to the real stderr as soon as it arrives. A no-op where descriptor 2 cannot be duplicated."""

    PREFIXES = (b"Corrupt JPEG data", b"Premature end of JPEG file", b"Invalid SOS parameters", b"Unsupported marker",
                b"libpng warning", b"libpng error", b"TIFFReadDirectory", b"TIFFFetchNormalTag", b"TIFFReadCustomDirectory")

    def __init__(self, tally: WarningTally):
        self.tally = tally
        self.saved: int | None = None

    def start(self) -> "_DecoderLineFilter":
        try:
            sys.stderr.flush()
            self.saved = os.dup(2)
            read_end, write_end = os.pipe()
            os.dup2(write_end, 2)
            os.close(write_end)
        except (OSError, ValueError, AttributeError):
            self.saved = None
            return self
        self.read_end = read_end
        self.thread = threading.Thread(target=self._pump, name="lungkit-stderr", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        if self.saved is None:
            return
        try:
            sys.stderr.flush()
        except (OSError, ValueError, AttributeError):
            pass
        os.dup2(self.saved, 2)  # closes the pipe's only write end: the thread reads to the end and stops
        self.thread.join()
        os.close(self.saved)
        os.close(self.read_end)
        self.saved = None

    def _pump(self) -> None:
        pending = b""
        while chunk := os.read(self.read_end, 1 << 16):
            pending = self._drain(pending + chunk)
        if pending:  # the pipe closed mid-line
            if pending.startswith(self.PREFIXES):
                self.tally.add(pending.decode("utf-8", "replace"))
            else:
                self._forward(pending)

    def _drain(self, buf: bytes) -> bytes:
        """Count each whole decoder message in `buf`, forward everything else at once; return what cannot be
        told yet (a message without its newline, or a tail that may start one). A message can begin mid-line:
        libjpeg writes right after a progress bar's "\r..." update, which has no newline."""
        while buf:
            starts = [i for i in (buf.find(p) for p in self.PREFIXES) if i >= 0]
            if not starts:
                keep = self._possible_start(buf)
                self._forward(buf[:len(buf) - keep])
                return buf[len(buf) - keep:]
            start = min(starts)
            self._forward(buf[:start])
            end = buf.find(b"\n", start)
            if end < 0:
                return buf[start:]
            self.tally.add(buf[start:end + 1].decode("utf-8", "replace"))
            buf = buf[end + 1:]
        return b""

    def _possible_start(self, buf: bytes) -> int:
        """Length of the longest tail of `buf` that a decoder message could continue from."""
        return max((k for p in self.PREFIXES for k in range(1, len(p)) if buf.endswith(p[:k])), default=0)

    def _forward(self, data: bytes) -> None:
        while data:
            data = data[os.write(self.saved, data):]

"""Decoder warnings counted, not printed: while a run decodes thousands of files, one odd file's libpng, pydicom
or Python warning must not flood the terminal. `WarningTally` collects them (Python warnings from any thread,
logging records, and the C decoders' lines on file descriptor 2) and the run prints one summary line."""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings


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

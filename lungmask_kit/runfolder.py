"""An output folder as a run: who may write to it (locks, shards), what kind of run it holds (a marker),
which images it has finished (the resume map), the merged manifest at the end (finalize, stale outputs), and
the summary of a run (`RunSummary`, the CLI's end-of-run table).

`segment` and `variants` both run inside a `RunFolder`. One unsharded run at a time; shards of one split
(`--shard K/N`) run side by side, each alone in its part of the images, and `lungkit merge` (or a plain
re-run) makes the one manifest. Another command's run (or a run of another input folder) is refused unless
`--overwrite`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

from lungmask_kit import defaults
from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import atomic_write_bytes, confined, remove_stale_temps
from lungmask_kit.fileio import lock_holder as _holder
from lungmask_kit.fileio import open_lock_file as _open_lock
from lungmask_kit.fileio import try_flock as _flock
from lungmask_kit.fileio import write_lock_holder as _write_holder
from lungmask_kit.manifest import (
    MANIFEST_NAME,
    PARTS_DIR,
    PartWriter,
    finalize,
    previous_table,
    read_metadata,
    resolve_folder,
)
from lungmask_kit.qc import reason_counts

RUN_FILE = defaults.RUN_FILE
LOCK_FILE = ".lungkit.lock"
SHARD_LOCK = ".lungkit-shard-{tag}.lock"
OUTPUT_COLUMNS = {"segment": ("mask_path", "lungs_path", "nolungs_path", "heart_path", "dicom_seg_path"), "variants": ("lungs_path", "nolungs_path")}


def folder_error(out: Path, err: OSError) -> LungkitError:
    """An OS error on a run's output folder (read-only, full, gone) as the one line the CLI prints."""
    return LungkitError(f"cannot write to output folder {out}: {err.strerror or err}")


def check_writable(out: Path) -> None:
    probe = out / f".lungkit-write-check-{socket.gethostname()}-{os.getpid()}"  # shards check side by side
    try:
        out.mkdir(parents=True, exist_ok=True)
        # written directly, not through a temp file: a run sweeping stale temp files (it holds the lock; this
        # process does not yet) would delete that temp file under us
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise folder_error(out, err) from err


@dataclass(frozen=True)
class Shard:
    """Part K of N of a run's images: an image belongs to shard hash(path) mod N, so the split is the same in
    every process and an image stays in its shard when files are added elsewhere in the folder."""

    index: int  # K, 1-based
    count: int  # N

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not m or not 1 <= int(m[1]) <= int(m[2]):
            raise LungkitError(f"--shard takes K/N with 1 <= K <= N, e.g. 3/8 (got {text!r})")
        return cls(int(m[1]), int(m[2]))

    @property
    def tag(self) -> str:
        return f"{self.index:04d}of{self.count:04d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, path: str) -> bool:
        digest = hashlib.sha1(path.encode("utf-8", "surrogateescape")).digest()
        return int.from_bytes(digest[:8], "big") % self.count == self.index - 1


class RunLock:
    """Advisory locks on OUT for the life of a run. An unsharded run (and `merge`) holds OUT/.lungkit.lock
    exclusively; a shard holds it shared plus its own shard lock exclusively, so shards of one split run
    together while an unsharded run, a second copy of a shard, or a shard of another split is refused. The
    kernel drops the locks when the process dies: a killed run's locks are taken over without a stale-lock dance."""

    def __init__(self, out: Path, shard: Shard | None = None):
        self.out, self.path, self.shard = out, out / LOCK_FILE, shard
        self.fds: list[int] = []
        self._mode = fcntl.LOCK_SH if shard else fcntl.LOCK_EX

    def __enter__(self) -> "RunLock":
        me = f"pid {os.getpid()} on {socket.gethostname()}" + (f", shard {self.shard}" if self.shard else "")
        try:
            fd = self._take(self.path, self._mode)
            if self.shard is None:
                _write_holder(fd, me)
                return self
            self._refuse_other_splits()
            _write_holder(self._take(self.out / SHARD_LOCK.format(tag=self.shard.tag), fcntl.LOCK_EX), me)
            _write_holder(fd, f"shards of {self.shard.count}, e.g. {me}")
            return self
        except BaseException:
            self.__exit__()
            raise

    def _take(self, path: Path, mode: int) -> int:
        fd = _open_lock(path)
        self.fds.append(fd)
        if not _flock(fd, mode):
            holder = _holder(fd)
            if path == self.path:
                raise LungkitError(f"another lungkit run ({holder}) is writing to {self.out}; "
                                   "wait for it to finish or choose another --out")
            raise LungkitError(f"shard {self.shard} is already running into {self.out} ({holder})")
        return fd

    def _refuse_other_splits(self) -> None:
        """Shards of another N would cover the same images twice at the same time."""

        for lock in self.out.glob(SHARD_LOCK.format(tag="*")):
            m = re.search(r"(\d{4})of(\d{4})\.lock$", lock.name)
            if not m or int(m[2]) == self.shard.count:
                continue
            fd = _open_lock(lock)
            try:
                if not _flock(fd, fcntl.LOCK_EX):
                    raise LungkitError(f"shards {int(m[1])}/{int(m[2])} of another split are running into {self.out}; "
                                       f"every shard of one output folder must use the same N")
            finally:
                os.close(fd)  # closing drops the probe's lock

    def __exit__(self, *exc) -> None:
        for fd in reversed(self.fds):
            os.close(fd)  # closing releases the lock; the files stay for the next run
        self.fds = []


@dataclass(frozen=True)
class RunKind:
    command: str  # segment | variants
    input_root: str  # real path of the input (images) folder

    def describe(self) -> str:
        return f"a `lungkit {self.command}` run of {self.input_root}"


def previous_kind(out: Path, manifest_name: str) -> RunKind | None:
    """What run the folder holds: its marker, else the metadata of a manifest written before markers existed."""
    marker = out / RUN_FILE
    try:
        data = json.loads(marker.read_text())
        return RunKind(data["command"], os.path.realpath(out / data["input_root"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass

    try:
        meta = read_metadata(out / manifest_name)
    except Exception:  # absent or damaged: nothing to protect by kind (damage is handled on resume)
        return None
    if "command" in meta and "input_root" in meta:
        return RunKind(meta["command"], os.path.realpath(resolve_folder(out / manifest_name, meta)))
    return None


def claim(out: Path, kind: RunKind, manifest_name: str, overwrite: bool) -> RunKind | None:
    """Check that OUT may become a run of `kind`: another kind is refused unless --overwrite. Returns the
    kind it replaces (None if none), whose outputs the earlier rows name; `mark` records the new kind once
    the run starts."""
    before = previous_kind(out, manifest_name)
    if before is None or before == kind:
        return None
    if not overwrite:
        raise LungkitError(f"{out} holds {before.describe()}; choose another --out, or pass --overwrite to replace it")
    return before


def mark(out: Path, kind: RunKind) -> None:
    """Record the kind of run; the input folder relative to OUT (no absolute path of this machine)."""
    relative = os.path.relpath(kind.input_root, os.path.realpath(out))
    atomic_write_bytes(out / RUN_FILE, json.dumps({"command": kind.command, "input_root": relative}).encode())


def keep_existing(root: Path, overwrite: bool) -> Callable[[str], bool]:
    """Which earlier rows outside this run's images stay in the merged manifest: those whose input is still in the
    input folder (rows of another --glob), none with --overwrite."""
    def keep(path: str) -> bool:
        return not overwrite and confined(path) and os.path.lexists(root / path)

    return keep


def remove_outputs(out: Path, rows: list[dict], command: str) -> int:
    """Delete the output files these manifest rows name (lungkit's own files only, inside OUT); returns how many."""
    removed = 0
    for row in rows:
        for column in OUTPUT_COLUMNS.get(command, ()):
            rel = row.get(column)
            if rel and confined(rel):
                try:
                    os.unlink(out / rel)
                    removed += 1
                except FileNotFoundError:
                    pass
    return removed


SHARD_RECORD = "shard-{tag}.json"  # in the parts folder: a finished shard's settings, for `lungkit merge`


class RunFolder:
    """One run into OUT, from the lock to the merged manifest.

    Entering checks that OUT is writable, takes the lock and claims the folder for `kind` (another kind only
    with `overwrite`); `start()` marks it once the run really begins. `done(key, columns)` is the resume map,
    `parts` the writer of this run's manifest parts, `finalize(...)` the merged manifest. Only an exclusive
    run (no shard) sweeps temp files: a shard must not delete the temp files of the shards beside it.
    """

    def __init__(self, out: Path, kind: RunKind, fields: list, overwrite: bool = False, shard: Shard | None = None,
                 manifest_name: str = MANIFEST_NAME):
        self.out, self.kind, self.fields, self.overwrite, self.shard = out, kind, fields, overwrite, shard
        self.manifest_name = manifest_name
        self.warnings: list[str] = []  # damaged manifest files set aside
        self._lock = RunLock(out, shard)

    def __enter__(self) -> "RunFolder":
        check_writable(self.out)
        self._lock.__enter__()
        try:
            replaced = claim(self.out, self.kind, self.manifest_name, self.overwrite)
            # whose outputs the earlier rows name (another command's, when --overwrite replaces its run)
            self.previous_command = replaced.command if replaced else self.kind.command
            if self.shard is None:
                remove_stale_temps(self.out)
        except OSError as err:  # read-only, full, or gone since the writable check
            self._lock.__exit__()
            raise folder_error(self.out, err) from err
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is not None and self.shard is None:
                remove_stale_temps(self.out)  # interrupted or failed: no temp file stays behind
        finally:
            self._lock.__exit__()

    def start(self) -> None:
        try:
            mark(self.out, self.kind)
        except OSError as err:
            raise folder_error(self.out, err) from err

    def done(self, key: str, columns: tuple[str, ...]) -> dict[str, tuple]:
        """manifest path -> `columns` of the images finished earlier (status ok) with settings `key`; none with
        --overwrite (the earlier manifest stays until this run's replaces it)."""
        prev = None if self.overwrite else previous_table(self.out, self.manifest_name, self.fields, self.warnings)
        if prev is None:
            return {}
        cols = prev.select(["path", "status", "settings_key", *columns]).to_pydict()
        return {p: tuple(cols[c][i] for c in columns) for i, p in enumerate(cols["path"])
                if cols["status"][i] == "ok" and cols["settings_key"][i] == key}

    @cached_property
    def parts(self):
        """The writer of this run's manifest parts (made on first use: `merge` writes none)."""
        return PartWriter(self.out, self.fields, tag=f"s{self.shard.tag}" if self.shard else None)

    def write_shard_record(self, record: dict) -> None:
        """What `lungkit merge` needs to finish the run once every shard is done."""
        path = self.out / PARTS_DIR / SHARD_RECORD.format(tag=self.shard.tag)
        atomic_write_bytes(path, json.dumps({"shard": str(self.shard), **record}, sort_keys=True).encode())

    def finalize(self, paths: list[str], metadata: dict, update=None,
                 keep_other: Callable[[str], bool] | None = None):
        """The merged manifest (manifest.finalize) and the outputs of dropped rows removed; (table, dropped)."""
        table, dropped = finalize(self.out, self.manifest_name, paths, self.fields, metadata, update=update,
                                  keep_other=keep_other, damaged=self.warnings)
        remove_outputs(self.out, dropped, self.previous_command)
        for lock in self.out.glob(SHARD_LOCK.format(tag="*")):  # no shard can run while this run holds OUT
            lock.unlink(missing_ok=True)
        return table, len(dropped)


@contextmanager
def reading_run(run: str | Path, reader: str):
    """Hold a run folder's lock shared while `reader` (publish, report) reads it: a segment or variants run into
    it (which takes the lock exclusively) is refused meanwhile, and a run already writing refuses the reader, so
    no dataset or page mixes files of two runs. A folder the reader may not write to is read unlocked (no
    lungkit run can write there either), as is one no lungkit run ever locked (no lock file)."""

    run = Path(run)
    folder = run if run.is_dir() else run.parent
    try:
        if not (folder / LOCK_FILE).is_file():
            raise FileNotFoundError(folder / LOCK_FILE)
        fd = _open_lock(folder / LOCK_FILE)
    except OSError:
        yield
        return
    try:
        if not _flock(fd, fcntl.LOCK_SH):
            raise LungkitError(f"{folder} is being written by another lungkit run ({_holder(fd)}): {reader} it when "
                               "that run has finished")
        _write_holder(fd, f"{reader}, reading it (pid {os.getpid()} on {socket.gethostname()})")
        yield
    finally:
        os.close(fd)  # closing drops the shared lock


def running_holder(out: Path) -> str | None:
    """Who is writing into OUT now (the lock's holder), or None when no run holds its lock."""

    if not (out / LOCK_FILE).is_file():
        return None
    fd = _open_lock(out / LOCK_FILE)
    try:
        return None if _flock(fd, fcntl.LOCK_EX) else _holder(fd)
    finally:
        os.close(fd)  # closing drops the probe's lock


def shard_records(out: Path) -> list[dict]:
    """The records of the shards that finished into OUT (unreadable ones, or JSON that is not a record, are
    skipped: their shard reruns)."""
    records = []
    for path in sorted((out / PARTS_DIR).glob(SHARD_RECORD.format(tag="*"))):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


@dataclass
class RunSummary:
    """What a segment or variants run did; printed by the CLI as its summary table."""

    found: int = 0
    skipped: int = 0  # already done with the same content and settings
    processed: int = 0  # decoded (and written, if readable) by this run
    ok: int = 0
    flagged: int = 0
    failed: int = 0
    seconds: float = 0.0  # wall time of the whole command, model loading included
    pipeline_seconds: float = 0.0  # from the first image read to the merged manifest
    manifest: str = ""
    unmatched_labels: int = 0
    label_conflicts: int = 0  # images whose label rows disagree (left unlabelled)
    errors: list[tuple[str, str]] = field(default_factory=list)
    flag_reasons: dict[str, int] = field(default_factory=dict)  # short reason -> flagged images
    output_folders: list[str] = field(default_factory=list)  # where the images went
    removed_stale: int = 0  # earlier rows dropped because their input left the input folder (outputs deleted)
    warnings: list[str] = field(default_factory=list)  # e.g. damaged manifest files set aside
    next_step: str = ""  # what the user does next (a shard: merge once every shard has finished)
    uncalibrated: bool = False  # the model had no quality statistics
    ignored: str = ""  # files under the input folder that are not images lungkit reads ("2 .webp, 1 .gif")
    model: str = ""  # what drew the masks and how it ran (segment): name, convention, device, runtime, precision

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def count(self, table) -> None:
        """ok / failed / flagged from the final manifest table."""
        status, qc = table.column("status").to_pylist(), table.column("qc_pass").to_pylist()
        self.ok = sum(s == "ok" for s in status)
        self.failed = sum(s == "error" for s in status)
        self.flagged = sum(q is False for q in qc)
        self.flag_reasons = dict(reason_counts(r for r in table.column("qc_reason").to_pylist() if r))

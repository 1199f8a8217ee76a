"""Atomic writes (a temp file in the destination folder, then renamed over the target) and safe input reads.

A killed process therefore never leaves a half-written file under its final name. `fsync=True` also makes
the bytes durable before the rename (manifests, weights); image outputs skip it -- it cost ~2.3 ms per
file here, ~7 ms per image -- since a lost image after a power cut is simply redone on resume.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Iterator

from lungmask_kit.errors import LungkitError

TMP_PREFIX = ".lungkit-tmp-"


def digest(payload) -> str:
    """A short, stable key of JSON-able settings (resume keys, the shape gate's and publish's keys): 16 hex digits
    of the sha256 of their JSON with sorted keys."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def utc_stamp() -> str:
    """Now, as the manifests' `finished_at` writes it (ISO 8601, UTC, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _current_umask() -> int:
    # os.umask can only be read by setting it; done once, at import, before any worker thread exists
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


UMASK = _current_umask()


def make_dirs(folder: str | Path) -> None:
    """mkdir -p without recursion (os.makedirs and Path.mkdir recurse once per missing level: a mirrored
    input tree deeper than Python's recursion limit would crash them)."""
    missing = []
    current = os.path.abspath(folder)
    while not os.path.isdir(current):
        missing.append(current)
        parent = os.path.dirname(current)
        if parent == current:
            break
        current = parent
    for d in reversed(missing):
        try:
            os.mkdir(d)
        except FileExistsError:
            if not os.path.isdir(d):
                raise


def atomic_write_bytes(path: str | Path, data: bytes, fsync: bool = True) -> None:
    path = Path(path)
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes 0600: follow the user's umask like any other writer
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def remove_stale_temps(root: str | Path) -> int:
    """Delete temp files left by a killed run under `root`; returns how many."""
    n = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.startswith(TMP_PREFIX):
                try:
                    os.unlink(os.path.join(dirpath, name))
                    n += 1
                except FileNotFoundError:
                    pass
    return n


class InputReadError(OSError):
    """An input that is not readable as a regular file (the message says why)."""


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of `path`, read only if it is a regular file (after following symlinks) and at most
    `max_bytes` long. FIFOs, devices, sockets and folders are refused without opening them in a way that
    could block; the size cap counts the bytes actually read (a device reports size 0)."""
    st = stat
    try:
        info = os.stat(path)  # follows symlinks; a cycle is ELOOP, a dangling link ENOENT
    except OSError as err:
        raise InputReadError(f"cannot read file: {err.strerror or err}") from err
    if not st.S_ISREG(info.st_mode):
        raise InputReadError(f"not a regular file ({_kind(info.st_mode)})")
    if info.st_size > max_bytes:
        raise InputReadError(f"file too large ({info.st_size} bytes > {max_bytes})")
    try:
        # O_NONBLOCK: if the path was swapped for a FIFO since the stat, opening it must not hang
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as err:
        raise InputReadError(f"cannot read file: {err.strerror or err}") from err
    with os.fdopen(fd, "rb", buffering=0) as fh:
        if not st.S_ISREG(os.fstat(fd).st_mode):
            raise InputReadError(f"not a regular file ({_kind(os.fstat(fd).st_mode)})")
        chunks, total = [], 0
        while True:
            chunk = fh.read(min(1 << 22, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                raise InputReadError(f"file too large (more than {max_bytes} bytes)")
    return b"".join(chunks)


def _kind(mode: int) -> str:
    st = stat
    for test, name in ((st.S_ISFIFO, "a FIFO"), (st.S_ISCHR, "a character device"), (st.S_ISBLK, "a block device"),
                       (st.S_ISSOCK, "a socket"), (st.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a plain file"


class OutsidePathError(InputReadError):
    """A path from a manifest or dataset that would lead out of the folder it belongs to."""


def confined(rel: str | None) -> bool:
    """Whether a relative path from a manifest stays inside its folder (no absolute path, no `..`, no drive)."""
    if not rel:
        return False
    p = PurePosixPath(rel.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not (p.parts and p.parts[0].endswith(":"))


def inside(path: str | Path, folder: str | Path) -> bool:
    """Whether `path` lies inside `folder` after resolving symlinks (never raises on loops)."""
    p, f = os.path.realpath(path), os.path.realpath(folder)
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def path_in(root: str | Path, rel: str | None, own: bool = False) -> Path:
    """`root / rel` for a path read from a manifest or a dataset (untrusted input), or OutsidePathError.

    Every such path is relative and free of `..`. `own`: the file is one lungkit wrote (a mask, a variant),
    never a symlink, so its resolved path must lie in `root` too; an input folder's symlinks are the user's
    (segment follows them), so for inputs only the written path is checked."""
    if not confined(rel):
        raise OutsidePathError(f"path {rel!r} leaves its folder (absolute or with ..): not followed")
    path = Path(root) / rel
    if own and not inside(path, root):
        raise OutsidePathError(f"{rel} resolves outside its folder (a symlink): not followed")
    return path


def apply_umask(folder: Path) -> None:
    """A folder tree's modes as the user's umask says (0755 / 0644 with umask 022): what a staging folder made
    by another route (tempfile, a library) may not have."""
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~UMASK)


def replace_folder(staging: Path, dest: Path) -> None:
    """Put a finished staging folder where `dest` is, replacing it: readers see the old folder or the new one,
    whole (two renames on one filesystem; the old one is deleted last)."""
    old = None
    if dest.exists():
        old = dest.parent / f".{dest.name}.lungkit-old-{os.getpid()}"
        os.replace(dest, old)
    os.replace(staging, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --- locks: advisory flock, dropped by the kernel when the process dies (no stale-lock dance) ---

def try_flock(fd: int, flags: int) -> bool:
    """Take a lock without waiting; False when another process holds it. A filesystem without locks (some
    NFS or Lustre mounts) is an error, not a silent pass: concurrent writers would then be unsafe."""

    try:
        fcntl.flock(fd, flags | fcntl.LOCK_NB)
        return True
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise LungkitError(f"cannot lock files in this folder ({err.strerror or err}): its filesystem does not "
                           "support flock (on Lustre, mount with -o flock)") from err


def open_lock_file(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)


def lock_holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 200).decode(errors="replace").strip() or "another process"


def write_lock_holder(fd: int, text: str) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, text.encode(), 0)


# --- folders built whole: report, publish ---

def check_replaceable(dest: Path, run: Path, marker: str, maker: str, allow_inside_run: bool = False) -> None:
    """Refuse an output folder that a build would replace whole unless `maker` made it (its `marker` file):
    a non-empty folder of the user's, a file, or one that holds the run (or lies in it, unless allowed)."""
    if inside(run, dest) or (not allow_inside_run and inside(dest, run)):
        raise LungkitError(f"the folder {dest} and the run {run} must not contain each other: choose another -o")
    if dest.exists() and not dest.is_dir():
        raise LungkitError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / marker).is_file():
        raise LungkitError(f"{dest} is a non-empty folder that {maker} did not make: choose another -o")


def output_error(dest: Path, err: OSError) -> LungkitError:
    """An OS error on an output folder as the one line the CLI prints (exit 2)."""
    where = err.filename or dest
    return LungkitError(f"cannot write {dest}: {err.strerror or err} ({where})")


@contextmanager
def output_errors(dest: str | Path) -> Iterator[None]:
    """OS errors while writing into `dest` (read-only, full, no permission, under /proc) as the one line the
    CLI prints; an input that cannot be read keeps its own error."""
    try:
        yield
    except InputReadError:
        raise
    except OSError as err:
        raise output_error(Path(dest), err) from err


@contextmanager
def staged_folder(dest: Path, run: Path, marker: str, maker: str, allow_inside_run: bool = False,
                  resumable: bool = False, warnings: list[str] | None = None) -> Iterator[Path]:
    """A folder built whole and then swapped in at `dest` (`check_replaceable` first). One build at a time per
    `dest`: a second is refused while the first holds `.DEST.lungkit-lock`. The caller fills the yielded staging
    folder; on success it takes the user's umask and replaces `dest`. On failure a fresh staging folder is
    removed, a `resumable` one (`.DEST.lungkit-partial`) is kept for the next run to resume from. An OS error
    (no space, read-only, no permission) is a LungkitError. The marker lists the files built, so that a re-run
    can say (in `warnings`) which files someone added to the folder since: they go with the old folder."""
    dest = Path(dest)
    check_replaceable(dest, run, marker, maker, allow_inside_run)
    lock = dest.parent / f".{dest.name}.lungkit-lock"
    try:
        make_dirs(dest.parent)
        fd = _take_build_lock(lock, dest)
    except OSError as err:
        raise output_error(dest, err) from err
    try:
        write_lock_holder(fd, f"{maker}, pid {os.getpid()} on {socket.gethostname()}")
        if resumable:
            staging = dest.parent / f".{dest.name}.lungkit-partial"
        else:
            for stale in dest.parent.glob(f".{dest.name}.lungkit-tmp-*"):  # interrupted builds (we hold the lock)
                shutil.rmtree(stale, ignore_errors=True)
            staging = dest.parent / f".{dest.name}.lungkit-tmp-{os.getpid()}"
        try:
            make_dirs(staging)
            yield staging
            if not (staging / CHECKSUMS).is_file():  # a folder with checksums lists itself there
                _list_files(staging, marker)
            foreign = _files_not_listed(dest, marker)
            apply_umask(staging)
            replace_folder(staging, dest)
            if foreign and warnings is not None:
                warnings.append(f"{len(foreign)} file(s) added to {dest} since lungkit made it were removed with the old "
                                f"folder (e.g. {foreign[0]}): keep your own files outside it")
        except BaseException as err:
            if not resumable:
                shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError) and not isinstance(err, InputReadError):
                err = output_error(dest, err)
            if resumable and isinstance(err, LungkitError):  # say what was kept, and why
                raise type(err)(f"{err} (the work done so far is kept in {staging}: the same command resumes from it)") from err
            raise err
    finally:
        lock.unlink(missing_ok=True)  # while still held: a waiter that opened it retries on the new file
        os.close(fd)


LISTING_HEADER = "# files of this folder, as lungkit built it:"
CHECKSUMS = "SHA256SUMS"  # `sha256sum -c` format: a dataset's own list of its files


def _list_files(folder: Path, marker: str) -> None:
    """Append the folder's file list to its marker (the marker's first line says what the folder is)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != marker)
    with open(folder / marker, "a", encoding="utf-8") as fh:
        fh.write("\n".join([LISTING_HEADER, *names]) + "\n")


def _files_not_listed(folder: Path, marker: str) -> list[str]:
    """Files in a folder lungkit built that neither its marker nor its SHA256SUMS lists (none known without a list)."""
    try:
        text = (folder / marker).read_text(encoding="utf-8", errors="replace")
        if LISTING_HEADER in text:
            listed = set(text.split(LISTING_HEADER, 1)[1].splitlines())
        elif (folder / CHECKSUMS).is_file():
            lines = (folder / CHECKSUMS).read_text(encoding="utf-8", errors="replace").splitlines()
            listed = {line.split("  ", 1)[1] for line in lines if "  " in line} | {CHECKSUMS}
        else:
            return []
    except OSError:
        return []
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.name != marker and p.relative_to(folder).as_posix() not in listed)


def _take_build_lock(lock: Path, dest: Path) -> int:
    """An exclusive lock on `lock`, a file removed when the build ends (nothing is left beside `dest`). A lock
    taken on a file another build has just unlinked is not the lock: take it again on the file now there."""

    while True:
        fd = open_lock_file(lock)
        if not try_flock(fd, fcntl.LOCK_EX):
            holder = lock_holder(fd)
            os.close(fd)
            raise LungkitError(f"another lungkit ({holder}) is building {dest}; wait for it to finish")
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)

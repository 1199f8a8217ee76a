"""An output folder as a run: one live run at a time (a lock), one kind of run (a marker), a writable check,
and the removal of lungkit's own outputs whose input has left the input folder.

`segment` and `variants` both go through `open_run`; a second live run into the same folder is refused,
another command's run (or a run of another input folder) is refused unless `--overwrite`.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lungmask_kit.errors import LungkitError
from lungmask_kit.fileio import atomic_write_bytes

RUN_FILE = ".lungkit-run.json"
LOCK_FILE = ".lungkit.lock"
OUTPUT_COLUMNS = {"segment": ("mask_path", "lungs_path", "nolungs_path"), "variants": ("lungs_path", "nolungs_path")}


def check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / ".lungkit-write-check", b"ok")
        os.unlink(out / ".lungkit-write-check")
    except OSError as err:
        raise LungkitError(f"cannot write to output folder {out}: {err.strerror or err}") from err


class RunLock:
    """An exclusive advisory lock on OUT/.lungkit.lock for the life of a run. The kernel drops it when the
    process dies, so the lock of a killed run is taken over by the next one without a stale-lock dance."""

    def __init__(self, out: Path):
        self.path = out / LOCK_FILE
        self.fd: int | None = None

    def __enter__(self) -> "RunLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise LungkitError(f"another lungkit run ({holder}) is writing to {self.path.parent}; "
                               "wait for it to finish or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing releases the lock; the file stays for the next run
            self.fd = None


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
    from lungmask_kit.manifest import read_metadata

    try:
        meta = read_metadata(out / manifest_name)
    except Exception:  # absent or damaged: nothing to protect by kind (damage is handled on resume)
        return None
    if "command" in meta and "input_root" in meta:
        from lungmask_kit.manifest import resolve_folder

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


def confined(rel: str | None) -> bool:
    """Whether a relative path from a manifest stays inside its folder (no absolute path, no `..`)."""
    if not rel:
        return False
    p = PurePosixPath(rel.replace("\\", "/"))
    return not p.is_absolute() and ".." not in p.parts and not (p.parts and p.parts[0].endswith(":"))


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


def check_replaceable(dest: Path, run: Path, marker: str, maker: str, allow_inside_run: bool = False) -> None:
    """Refuse an output folder that a build would replace whole unless `maker` made it (its `marker` file):
    a non-empty folder of the user's, a file, or one that holds the run (or lies in it, unless allowed)."""
    from lungmask_kit.discovery import inside

    if inside(run, dest) or (not allow_inside_run and inside(dest, run)):
        raise LungkitError(f"the folder {dest} and the run {run} must not contain each other: choose another -o")
    if dest.exists() and not dest.is_dir():
        raise LungkitError(f"{dest} exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()) and not (dest / marker).is_file():
        raise LungkitError(f"{dest} is a non-empty folder that {maker} did not make: choose another -o")

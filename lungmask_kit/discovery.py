"""Finding images on disk in a stable order, and matching images to masks."""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from lungmask_kit import defaults


def is_image_name(name: str, dicom: bool = False) -> bool:
    """Whether a file name is an input image. `dicom` (--dicom) adds the names DICOM files often have: none
    with an extension, or a UID (`1.2.840.113619.2.55.3`); a DICOMDIR is an index, not an image."""
    if name.lower().endswith(defaults.IMAGE_EXTENSIONS):
        return True
    if not dicom or name.upper() == "DICOMDIR":
        return False
    suffix = PurePosixPath(name).suffix
    return not suffix or suffix[1:].isdigit()


def wants_dicom(rel: str, dicom: bool = False) -> bool:
    """Whether to read a discovered file as DICOM even without the preamble: named .dcm, or found by --dicom."""
    name = rel.lower()
    return name.endswith(defaults.DICOM_EXTENSIONS) or (dicom and not name.endswith(defaults.IMAGE_EXTENSIONS))


@dataclass
class Scan:
    """What a walk of an input folder found: the images, the files it does not read (by extension), and the
    lungkit output folders inside it, which are never read as input."""

    images: list[str]
    ignored: Counter = field(default_factory=Counter)  # ".webp" -> files
    output_folders: list[str] = field(default_factory=list)  # relative paths

    def ignored_text(self) -> str:
        """"6 files: 2 .webp, 1 .gif, ..." (empty when none)."""
        n = sum(self.ignored.values())
        if not n:
            return ""
        return f"{n} file(s): " + ", ".join(f"{k} {ext}" for ext, k in self.ignored.most_common())


def find_images(root: str | Path, glob: str | None = None, dicom: bool = False) -> list[str]:
    """Relative POSIX paths of every image under `root`, sorted (see scan_images)."""
    return scan_images(root, glob, dicom).images


def scan_images(root: str | Path, glob: str | None = None, dicom: bool = False) -> Scan:
    """Every image under `root` (relative POSIX paths, sorted); `glob` filters the relative path; `dicom` also
    takes extensionless files (see is_image_name). Files of other types are counted by extension; a folder
    lungkit wrote (defaults.OUTPUT_MARKERS) is skipped whole.

    An explicit stack, not recursion, so folder depth has no limit. Symlinked folders are followed once
    (loops are cut by tracking real paths); hidden files and our own temp files are skipped. Whether an
    entry is a readable regular file is decided when it is read, so a bad entry costs one error row.
    """
    root = Path(root)
    scan = Scan([])
    seen_dirs: set[str] = {os.path.realpath(root)}
    stack: list[tuple[str, str]] = [(str(root), "")]  # (folder on disk, its relative POSIX path)
    while stack:
        folder, rel_dir = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue  # unreadable or vanished folder: nothing to find there
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if _is_dir(entry):
                real = os.path.realpath(entry.path)
                if real in seen_dirs:
                    continue
                seen_dirs.add(real)
                if any(os.path.lexists(os.path.join(entry.path, m)) for m in defaults.OUTPUT_MARKERS):
                    scan.output_folders.append(rel)
                else:
                    stack.append((entry.path, rel))
            elif not glob or fnmatch.fnmatch(rel, glob) or fnmatch.fnmatch(entry.name, glob):
                if is_image_name(entry.name, dicom):
                    scan.images.append(rel)
                else:
                    scan.ignored[PurePosixPath(entry.name).suffix.lower() or "(no extension)"] += 1
    scan.images.sort()
    scan.output_folders.sort()
    return scan


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir(follow_symlinks=True)
    except OSError:  # a symlink loop or a vanished target is not a folder
        return False


def output_names(rel_paths: list[str]) -> dict[str, str]:
    """Map each input relative path to an output relative path ending in .png, distinct for every input
    (also on case-insensitive filesystems).

    `a/x.png` and `b/x.png` stay apart because folders are mirrored. Names that would collide keep their
    extension (`x.jpg` -> `x.jpg.png`); if that collides too (`x.jpg.png` is also an input), the name gets
    a short hash of the input path (`x.jpg.1a2b3c4d.png`).
    """
    def plain(rel: str) -> str:
        return str(PurePosixPath(rel).with_suffix(".png"))

    counts: dict[str, int] = {}
    for rel in rel_paths:
        counts[plain(rel).lower()] = counts.get(plain(rel).lower(), 0) + 1
    names = {rel: plain(rel) if counts[plain(rel).lower()] == 1 else rel + ".png" for rel in rel_paths}
    users: dict[str, list[str]] = {}
    for rel, name in names.items():
        users.setdefault(name.lower(), []).append(rel)
    for colliding in (group for group in users.values() if len(group) > 1):
        for rel in colliding:
            digest = hashlib.sha256(rel.encode("utf-8", "surrogateescape")).hexdigest()[:8]
            names[rel] = f"{rel}.{digest}.png"
    return names


@functools.lru_cache(maxsize=64)
def _path_limits(folder: str) -> tuple[int, int, int]:
    """(longest file name, longest path, length of the folder's absolute path) in bytes."""
    try:
        name_max, path_max = os.pathconf(folder, "PC_NAME_MAX"), os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError):
        name_max, path_max = 255, 4096
    return name_max, path_max, len(os.fsencode(os.path.abspath(folder)))


def output_path_problem(out: str | Path, rel: str) -> str | None:
    """Why OUT/rel cannot be created on this system (a name or path over its limits), or None."""
    name_max, path_max, base = _path_limits(str(out))
    parts = [os.fsencode(part) for part in PurePosixPath(rel).parts]
    longest = max(len(part) for part in parts)
    if longest > name_max:
        return f"output name too long ({longest} bytes > {name_max}): rename or move the input"
    if base + sum(len(part) + 1 for part in parts) >= path_max:
        return f"output path too long (limit {path_max} bytes): use a shorter --out"
    return None


def stem_key(rel: str) -> str:
    """Relative path without extension, for matching an image to its mask."""
    return str(PurePosixPath(rel).with_suffix(""))

"""Finding images on disk in a stable order, and matching images to masks."""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path, PurePosixPath

from lungmask_kit import defaults


def is_image_name(name: str) -> bool:
    return name.lower().endswith(defaults.IMAGE_EXTENSIONS)


def find_images(root: str | Path, glob: str | None = None) -> list[str]:
    """Relative POSIX paths of every image under `root`, sorted; `glob` filters the relative path.

    Symlinked folders are followed once (loops are cut by tracking real paths); hidden files and our own
    temp files are skipped.
    """
    root = Path(root)
    found: list[str] = []
    seen_dirs: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = PurePosixPath(Path(dirpath).relative_to(root).as_posix())
        for name in filenames:
            if name.startswith(".") or not is_image_name(name):
                continue
            rel = str(rel_dir / name) if str(rel_dir) != "." else name
            if glob and not (fnmatch.fnmatch(rel, glob) or fnmatch.fnmatch(name, glob)):
                continue
            found.append(rel)
    return sorted(found)


def output_names(rel_paths: list[str]) -> dict[str, str]:
    """Map each input relative path to its output relative path with a .png suffix.

    `a/x.png` and `b/x.png` stay apart because folders are mirrored; `a/x.png` and `a/x.jpg` would
    collide, so colliding names keep their original extension (`a/x.jpg.png`).
    """
    def plain(rel: str) -> str:
        return str(PurePosixPath(rel).with_suffix(".png"))

    counts: dict[str, int] = {}
    for rel in rel_paths:
        key = plain(rel).lower()
        counts[key] = counts.get(key, 0) + 1
    return {rel: (plain(rel) if counts[plain(rel).lower()] == 1 else rel + ".png") for rel in rel_paths}


def stem_key(rel: str) -> str:
    """Relative path without extension, for matching an image to its mask."""
    return str(PurePosixPath(rel).with_suffix(""))

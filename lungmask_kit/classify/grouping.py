"""Who is one patient when the data does not say: images without a patient id are grouped into pseudo-patients,
so that one person's copies never land on both sides of the split.

Kaggle-style folder corpora hold byte-identical copies and re-saved, flipped or brightened copies of one
radiograph. Exact copies share a sha256; near copies share a perceptual hash: the signs of the 255 lowest
DCT frequencies of the 64x64 image against their median (a brightness change moves only the DC term; a
flip is tried both ways), compared by Hamming distance. On cxr-cls, re-encoded (JPEG q60), rescaled (0.7),
brightened (x0.85-1.15) and flipped copies were at most 22 bits from their source and distinct patients'
images at least 42 (same-patient follow-ups 34 and below): NEAR_BITS = 28 sits between.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np

from lungmask_kit.errors import LungkitError
from lungmask_kit.imaging import ImageDecodeError, read_input
from lungmask_kit.runtime import available_cores

NEAR_BITS = 28  # Hamming distance (of 255 bits) at or under which two images are copies of one radiograph
MAX_NEAR_SEARCH = 60_000  # images compared pairwise (O(n^2)); above, exact copies only (said)
SYNTHETIC = "image:"  # the patient id of an image the data gives none for


@dataclass
class Grouping:
    how: str  # one sentence for the summary and results.md
    merged_exact: int = 0  # images joined to another by sha256
    merged_near: int = 0  # images joined to another by perceptual hash


def patients_from_paths(paths: list[str], pattern: str) -> dict[str, str]:
    """--patient-from REGEX: each path's patient id, the regex's first group (or whole match); paths it does
    not match keep no id."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise LungkitError(f"--patient-from {pattern!r} is not a regular expression: {err}") from err
    found = {}
    for path in paths:
        m = regex.search(path)
        if m:
            found[path] = m.group(1) if regex.groups else m.group(0)
    return found


def perceptual_hash(pixels: np.ndarray) -> np.ndarray:
    """(2, 255) bool: the hash of the image and of its mirror image."""
    small = cv2.resize(pixels.astype(np.float32), (64, 64), interpolation=cv2.INTER_AREA)
    out = []
    for view in (small, cv2.flip(small, 1)):
        low = cv2.dct(view)[:16, :16].flatten()[1:]
        out.append(low > np.median(low))
    return np.array(out)


def group_copies(keys: list[str], sha256: list[str | None], files: list, workers: int = 0) -> tuple[dict[str, str], Grouping]:
    """Pseudo-patient id per key: keys whose files are exact (sha256) or near (perceptual hash) copies share one."""
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(i: int, j: int) -> bool:
        a, b = find(i), find(j)
        if a == b:
            return False
        parent[max(a, b)] = min(a, b)
        return True

    first: dict[str, int] = {}
    exact = 0
    for i, digest in enumerate(sha256):
        if digest:
            exact += union(first.setdefault(digest, i), i)
    near, searched = 0, len(keys) <= MAX_NEAR_SEARCH
    if searched and len(keys) > 1:
        with ThreadPoolExecutor(workers or available_cores()) as pool:
            hashes = list(pool.map(_hash_or_none, files))
        known = [i for i, h in enumerate(hashes) if h is not None]
        if known:
            packed = np.stack([np.packbits(hashes[i], axis=-1) for i in known])  # (n, 2, 32) uint8
            for a, b in _near_pairs(packed):
                near += union(known[a], known[b])
    groups = {k: f"{SYNTHETIC}{keys[find(i)]}" for i, k in enumerate(keys)}
    how = (f"{len(keys)} image(s) without a patient id grouped into {len(set(groups.values()))} pseudo-patient(s): "
           f"{exact} exact copies (sha256) and {near} near copies (perceptual hash, flips and re-encodes included) joined")
    if not searched:
        how += f"; near copies not searched (over {MAX_NEAR_SEARCH} images: give patient ids or --patient-from)"
    return groups, Grouping(how, exact, near)


def _hash_or_none(path) -> np.ndarray | None:
    try:
        return perceptual_hash(read_input(path)[1].pixels)
    except (OSError, ImageDecodeError):
        return None  # the image fails later, where it is read for training


def _near_pairs(packed: np.ndarray, chunk: int = 512):
    """(i, j), i < j, whose hashes (either orientation of j) are within NEAR_BITS."""
    plain = packed[:, 0]
    for start in range(0, len(packed), chunk):
        block = packed[start:start + chunk]  # (c, 2, 32)
        d = np.minimum(np.bitwise_count(block[:, None, 0] ^ plain[None]).sum(-1),
                       np.bitwise_count(block[:, None, 1] ^ plain[None]).sum(-1))
        for a, b in zip(*np.nonzero(d <= NEAR_BITS)):
            if start + a < b:
                yield int(start + a), int(b)

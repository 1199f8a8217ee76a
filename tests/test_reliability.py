"""Crash-resume, bad-input, output-safety, weights-safety and determinism suites for segment and variants."""

from __future__ import annotations

import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from lungmask_kit.cli.app import main
from lungmask_kit.manifest import PARTS_DIR

from conftest import cxr_like, image_mask_pairs, write_png

PIL = pytest.importorskip("PIL.Image")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "lungmask_kit.cli.app", *map(str, args)]


def _corpus(root: Path, n: int) -> Path:
    for i in range(n):
        write_png(root / f"g{i % 3}" / f"img{i:02d}.png", cxr_like(180 + 5 * i, 200, seed=i))
    return root


def _no_leftovers(out: Path) -> None:
    assert not list(out.rglob(".lungkit-tmp-*")), "temp files left behind"
    assert not (out / PARTS_DIR).exists()
    for png in out.rglob("*.png"):
        assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED) is not None, f"partial file {png}"


def test_sigkill_at_random_moments_then_resume(tmp_path, random_weights):
    src = _corpus(tmp_path / "in", 30)
    clean = tmp_path / "clean"
    subprocess.run(_cli("segment", src, "-o", clean, "-w", random_weights, "-b", "4", "-q"), check=True)
    out = tmp_path / "out"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(5):
        proc = subprocess.Popen(_cli("segment", src, "-o", out, "-w", random_weights, "-b", "4", "-q"),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait(timeout=120)
    assert kills >= 2, "the run finished before it could be killed; use more images"
    final = subprocess.run(_cli("segment", src, "-o", out, "-w", random_weights, "-b", "4"), capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr
    m = pd.read_parquet(out / "manifest.parquet")
    assert len(m) == 30 and m.path.is_unique and (m.status == "ok").all()
    _no_leftovers(out)
    for kind in ("masks", "lungs", "nolungs"):
        for f in sorted((clean / kind).rglob("*.png")):
            assert (out / f.relative_to(clean)).read_bytes() == f.read_bytes(), f"{f} differs from the clean run"


def test_variants_sigkill_then_resume(tmp_path):
    images, masks = image_mask_pairs(tmp_path, 60)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("variants", "--images", images, "--masks", masks, "-o", out, "-j", "1", "-q"))
    deadline = time.time() + 120
    while time.time() < deadline and not any((out / "lungs").glob("*.png")):  # killed once writing has begun
        time.sleep(0.02)
    assert proc.poll() is None, "variants finished before it could be killed; use more images"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert main(["variants", "--images", str(images), "--masks", str(masks), "-o", str(out), "-j", "1", "-q"]) == 0
    m = pd.read_parquet(out / "manifest.parquet")
    assert len(m) == 60 and m.path.is_unique and (m.status == "ok").all()
    _no_leftovers(out)


def _bad_corpus(root: Path) -> dict[str, str | None]:
    """Write the bad-input corpus; returns {relative path: expected error substring, or None for ok}."""
    good = cxr_like(240, 200)
    png = cv2.imencode(".png", good)[1].tobytes()
    jpg = cv2.imencode(".jpg", good)[1].tobytes()
    expect: dict[str, str | None] = {}

    def put(rel, data, expected):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        expect[rel] = expected

    put("zero.png", b"", "empty file")
    put("trunc.png", png[: len(png) // 2], "truncated PNG")
    put("trunc.jpg", jpg[: len(jpg) // 2], "truncated JPEG")
    put("text.png", b"this is a text file\n" * 10, "not a decodable image")
    put("deep16.png", cv2.imencode(".png", cxr_like(240, 200, dtype=np.uint16))[1].tobytes(), None)
    put("rgba.png", cv2.imencode(".png", np.dstack([good] * 3 + [np.full_like(good, 128)]))[1].tobytes(), None)
    import io

    buf = io.BytesIO()
    PIL.fromarray(good).convert("P").save(buf, "PNG")
    put("palette.png", buf.getvalue(), None)
    buf = io.BytesIO()
    PIL.fromarray(np.dstack([good] * 3)).convert("CMYK").save(buf, "JPEG")
    put("cmyk.jpg", buf.getvalue(), None)
    put("one_pixel.png", cv2.imencode(".png", np.array([[128]], np.uint8))[1].tobytes(), None)
    bomb = bytearray(cv2.imencode(".png", cxr_like(8, 8))[1].tobytes())
    bomb[16:24] = (200000).to_bytes(4, "big") * 2
    put("bomb.png", bytes(bomb), "too large")
    buf = io.BytesIO()
    pil = PIL.fromarray(good)
    exif = pil.getexif()
    exif[0x0112] = 6
    pil.save(buf, "JPEG", exif=exif.tobytes())
    put("exif_rotated.jpg", buf.getvalue(), None)
    put("name with spaces.png", png, None)
    # a name that is not valid UTF-8
    raw = os.path.join(os.fsencode(root), b"latin1_\xe9.png")
    with open(raw, "wb") as fh:
        fh.write(png)
    expect["latin1_\\xe9.png"] = None
    # unreadable: permissions (not enforced for root) and a dangling symlink
    put("noperm.png", png, None if os.geteuid() == 0 else "cannot read file")
    os.chmod(root / "noperm.png", 0)
    os.symlink(root / "does-not-exist.png", root / "dangling.png")
    expect["dangling.png"] = "cannot read file"
    os.makedirs(root / "loop")
    os.symlink(root / "loop", root / "loop" / "again")  # a symlink loop
    os.makedirs(root / "empty_dir")
    return expect


def test_bad_input_corpus(tmp_path, random_weights, capsys):
    src = tmp_path / "bad"
    expect = _bad_corpus(src)
    out = tmp_path / "out"
    rc = main(["segment", str(src), "-o", str(out), "-w", str(random_weights), "-b", "4", "-q"])
    assert rc == 1  # documented: some images failed, the others are done
    m = pd.read_parquet(out / "manifest.parquet").set_index("path")
    assert sorted(m.index) == sorted(expect)
    for rel, expected in expect.items():
        row = m.loc[rel]
        if expected is None:
            assert row.status == "ok", f"{rel}: {row.error}"
            mask = cv2.imread(str(out / row.mask_path), cv2.IMREAD_UNCHANGED)
            assert mask.shape == (row.height, row.width)
        else:
            assert row.status == "error" and expected in row.error, f"{rel}: {row.error}"
    assert m.loc["exif_rotated.jpg", ["width", "height"]].tolist() == [240, 200]  # rotated on decode
    assert m.loc["deep16.png", "bit_depth"] == 16 and m.loc["rgba.png", "source_channels"] == 3  # alpha ignored
    assert "failed" in capsys.readouterr().err
    os.chmod(src / "noperm.png", 0o644)


def test_labels_cannot_make_writes_escape_out(tmp_path, small_corpus, random_weights):
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n../../escape.png,covid\n/etc/passwd,covid\n")
    out = tmp_path / "deep" / "out"
    before = set(tmp_path.rglob("*"))
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights), "--labels", str(labels), "-q"]) == 0
    created = {p for p in set(tmp_path.rglob("*")) - before if not p.is_dir()}
    assert created and all(out in p.parents for p in created)


def test_full_disk_mid_run_gives_clear_error_and_keeps_manifest(tmp_path, small_corpus, random_weights, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights), "-q"]) == 0
    manifest_before = (out / "manifest.parquet").read_bytes()
    import lungmask_kit.segment.steps as seg  # where the writer writes

    def full(path, data, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(seg, "atomic_write_bytes", full)
    rc = main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights), "--overwrite", "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and ("disk full" in err or "No space left" in err)
    assert (out / "manifest.parquet").read_bytes() == manifest_before
    monkeypatch.undo()
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights), "-q"]) == 0


def test_read_only_output_is_a_clear_error(tmp_path, small_corpus, random_weights, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: simulate the read-only file system
        import lungmask_kit.segment.steps as seg  # where the writer writes

        def read_only(path, data, **kw):
            raise OSError(errno.EROFS, "Read-only file system")

        import lungmask_kit.runfolder as runfolder

        monkeypatch.setattr(seg, "atomic_write_bytes", read_only)
        monkeypatch.setattr(runfolder, "atomic_write_bytes", read_only)  # the writable check lives there
    else:
        os.chmod(out, 0o555)
    rc = main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights), "-q"])
    os.chmod(out, 0o755)
    assert rc == 2 and "cannot write to output folder" in capsys.readouterr().err
    assert not (out / "manifest.parquet").exists()


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_weights_never_unpickle_and_tampering_is_caught(tmp_path, random_weights, small_corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(_Evil()))
    assert main(["segment", str(small_corpus), "-o", "o1", "-w", str(evil), "-q"]) == 4
    assert "no pickles" in capsys.readouterr().err and not (tmp_path / "PWNED").exists()
    # a pickle renamed to .safetensors is still only parsed as safetensors
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(pickle.dumps(_Evil()))
    fake.with_suffix(".json").write_text(random_weights.with_suffix(".json").read_text().replace('"sha256"', '"sha256_"'))
    assert main(["segment", str(small_corpus), "-o", "o2", "-w", str(fake), "-q"]) == 4
    assert "not a valid safetensors file" in capsys.readouterr().err and not (tmp_path / "PWNED").exists()
    # one flipped byte: the checksum in the config catches it
    tampered = tmp_path / "tampered.safetensors"
    data = bytearray(random_weights.read_bytes())
    data[-100] ^= 0xFF
    tampered.write_bytes(bytes(data))
    tampered.with_suffix(".json").write_text(random_weights.with_suffix(".json").read_text())
    assert main(["segment", str(small_corpus), "-o", "o3", "-w", str(tampered), "-q"]) == 4
    assert "does not match the sha256" in capsys.readouterr().err
    # weights of another architecture than the config says
    import json

    cfg = json.loads(random_weights.with_suffix(".json").read_text())
    cfg["encoder"] = "resnet18"
    cfg["provenance"].pop("sha256")
    mismatched = tmp_path / "mismatch.safetensors"
    mismatched.write_bytes(random_weights.read_bytes())
    mismatched.with_suffix(".json").write_text(json.dumps(cfg))
    assert main(["segment", str(small_corpus), "-o", "o4", "-w", str(mismatched), "-q"]) == 4
    assert "does not fit a FPN/resnet18 model" in capsys.readouterr().err


def test_same_input_gives_byte_identical_masks(tmp_path, small_corpus, random_weights):
    # two runs with the same settings (batch size 2: one full batch and one padded one)
    for name in ("a", "b"):
        assert main(["segment", str(small_corpus), "-o", str(tmp_path / name), "-w", str(random_weights), "-b", "2", "-q"]) == 0
    masks = sorted((tmp_path / "a" / "masks").glob("*.png"))
    assert len(masks) == 3
    for f in masks:
        assert f.read_bytes() == (tmp_path / "b" / "masks" / f.name).read_bytes()

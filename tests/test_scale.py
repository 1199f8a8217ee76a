"""Past one process: shards into one folder and `lungkit merge`, the locks between runs, the GPU path's code on
the CPU (device-side resize and normalise, JPEG decoding through torchvision, CUDA out-of-memory retry), the
checked manifest row."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import cxr_like, write_png

from lungmask_kit.cli.app import main
from lungmask_kit.errors import LungkitError
from lungmask_kit.runfolder import RunLock, Shard
from lungmask_kit.segment import SegmentOptions, run_segment

OUTPUTS = ("masks", "lungs", "nolungs")


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "lungmask_kit.cli.app", *map(str, args)]


def _corpus(root: Path, n: int = 14) -> Path:
    for i in range(n):
        write_png(root / f"d{i % 3}" / f"img{i:02d}.png", cxr_like(300 + 11 * i, 270 + 3 * i, seed=i))
    (root / "d0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _table(out: Path):
    t = pq.read_table(out / "manifest.parquet")
    return t.replace_schema_metadata(None)


def _same_outputs(a: Path, b: Path) -> None:
    for kind in OUTPUTS:
        names = sorted(p.relative_to(a) for p in (a / kind).rglob("*.png"))
        assert names and names == sorted(p.relative_to(b) for p in (b / kind).rglob("*.png"))
        for name in names:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.fixture(scope="module")
def corpus_and_single(tmp_path_factory, random_weights):
    """A corpus with one broken file, and the single-process run every sharded run must equal."""
    root = tmp_path_factory.mktemp("scale")
    src = _corpus(root / "in")
    single = root / "single"
    assert main(["segment", str(src), "-o", str(single), "-w", str(random_weights), "-b", "4", "-q"]) == 1  # broken.png
    return src, single


def test_shard_partition_is_stable_and_complete():
    paths = [f"dir{i % 7}/img{i}.png" for i in range(1000)]
    shards = [Shard(k, 4) for k in range(1, 5)]
    owners = [[s.owns(p) for s in shards] for p in paths]
    assert all(sum(o) == 1 for o in owners)  # each image in exactly one shard
    sizes = [sum(o[k] for o in owners) for k in range(4)]
    assert min(sizes) > 200  # and the shards are even
    # adding files elsewhere moves no image between shards (a hash of its own path decides)
    assert [[s.owns(p) for s in shards] for p in paths] == owners
    for bad in ("0/2", "3/2", "2", "a/b", ""):
        with pytest.raises(LungkitError):
            Shard.parse(bad)


def test_two_concurrent_shards_and_merge_equal_a_single_run(tmp_path, random_weights, corpus_and_single):
    src, single = corpus_and_single
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cli("segment", src, "-o", out, "-w", random_weights, "-b", "4", "--shard", f"{k}/2"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in (1, 2)]
    results = [(p.wait(timeout=600), *p.communicate()) for p in procs]
    # the broken file fails in whichever shard holds it (exit 1), the other shard exits 0
    assert sorted(rc for rc, _, _ in results) == [0, 1], results
    for _, stdout, _ in results:
        assert "lungkit merge" in stdout and "Traceback" not in stdout
    assert not (out / "manifest.parquet").exists()
    assert main(["merge", str(out), "-q"]) == 1  # the broken file is a failed row, as in the single run
    assert _table(out).equals(_table(single))
    _same_outputs(out, single)
    meta = pq.read_schema(out / "manifest.parquet").metadata
    assert b'"shards": 2' in meta[b"lungkit"]
    assert not (out / ".manifest-parts").exists() and not list(out.glob(".lungkit-shard-*.lock"))


def test_a_killed_shard_resumes_and_merge_waits_for_it(tmp_path, random_weights, corpus_and_single, capsys):
    src, single = corpus_and_single
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("segment", src, "-o", out, "-w", random_weights, "-b", "2", "--shard", "1/2", "-q"),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list((out / ".manifest-parts").glob("part-*.parquet")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert main(["segment", str(src), "-o", str(out), "-w", str(random_weights), "-b", "4", "--shard", "2/2", "-q"]) in (0, 1)
    capsys.readouterr()
    # shard 1 has not finished: merge says which shard to run again
    assert main(["merge", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shard(s) 1/2 did not finish" in err[0]
    # -b 2 was killed; its rerun at -b 2 skips what it finished (-b 4 would redo them: another batch size)
    s = run_segment(src, out, SegmentOptions(weights=random_weights, batch_size=2, shard="1/2", progress=False))
    assert s.skipped >= 1 and s.skipped + s.processed == s.found
    # the killed shard ran at batch 2: a plain re-run at batch 4 (like the single run) redoes those images and
    # writes the manifest, as merge would
    summary = run_segment(src, out, SegmentOptions(weights=random_weights, batch_size=4, progress=False))
    assert summary.processed >= s.found and summary.skipped + summary.processed == summary.found
    assert _table(out).equals(_table(single))
    _same_outputs(out, single)
    assert not list(out.rglob(".lungkit-tmp-*"))


def test_runs_into_one_folder_lock_each_other_out(tmp_path, random_weights, corpus_and_single, capsys):
    src, _ = corpus_and_single
    out = tmp_path / "out"
    out.mkdir()
    opts = dict(weights=random_weights, progress=False)
    with RunLock(out, Shard(1, 2)):  # a shard is running
        with pytest.raises(LungkitError, match="another lungkit run"):
            run_segment(src, out, SegmentOptions(**opts))  # an unsharded run is refused
        with pytest.raises(LungkitError, match="shard 1/2 is already running"):
            run_segment(src, out, SegmentOptions(shard="1/2", **opts))
        with pytest.raises(LungkitError, match="another split"):
            run_segment(src, out, SegmentOptions(shard="1/3", **opts))
        assert main(["merge", str(out)]) == 2
        assert "no finished shard" in capsys.readouterr().err
        with RunLock(out, Shard(2, 2)):  # the other shard of the split runs alongside
            pass
    with RunLock(out):  # an unsharded run is running: shards are refused
        with pytest.raises(LungkitError, match="another lungkit run"):
            run_segment(src, out, SegmentOptions(shard="2/2", **opts))
    with pytest.raises(LungkitError, match="--overwrite cannot be combined with --shard"):
        run_segment(src, out, SegmentOptions(shard="1/2", overwrite=True, **opts))


def test_two_unsharded_processes_one_is_refused(tmp_path, random_weights, corpus_and_single):
    src, single = corpus_and_single
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cli("segment", src, "-o", out, "-w", random_weights, "-b", "4", "-q"),
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = sorted((p.wait(timeout=600), p.stderr.read()) for p in procs)
    (rc_ok, _), (rc_refused, err) = results
    if rc_refused == 2:  # the usual case: they overlapped and the second was refused with one line
        assert "another lungkit run" in err and "Traceback" not in err
    else:  # the first had finished before the second started: the second resumed (both exit 1: broken.png)
        assert rc_refused == 1
    assert rc_ok == 1
    assert _table(out).equals(_table(single))
    _same_outputs(out, single)


def test_cuda_out_of_memory_halves_the_batch_and_loses_no_image(tmp_path, random_weights, monkeypatch):
    from lungmask_kit.runtimes.torch import TorchRuntime

    src = tmp_path / "in"
    for i in range(9):
        write_png(src / f"x{i}.png", cxr_like(280 + 9 * i, 260, seed=i))
    real = TorchRuntime._forward
    seen = []

    def small_memory(self, x):
        seen.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(self, x)

    monkeypatch.setattr(TorchRuntime, "_forward", small_memory)
    s = run_segment(src, tmp_path / "oom", SegmentOptions(weights=random_weights, batch_size=8, progress=False,
                                                          runtime="torch"))
    assert s.ok == 9 and s.failed == 0
    notes = [w for w in s.warnings if "out of memory" in w]
    assert len(notes) == 1 and "batch of 8" in notes[0] and "batches of 2" in notes[0]
    assert seen.count(8) == 1 and seen.count(4) == 1  # halved once to 4, once to 2, then stays at 2
    monkeypatch.setattr(TorchRuntime, "_forward", real)
    run_segment(src, tmp_path / "b2", SegmentOptions(weights=random_weights, batch_size=2, progress=False,
                                                     runtime="torch"))
    _same_outputs(tmp_path / "oom", tmp_path / "b2")  # the images went through in batches of 2


def test_device_prepare_matches_the_host_path():
    from lungmask_kit.accel import prepare_on_device
    from lungmask_kit.imaging import prepare_input

    cpu = torch.device("cpu")
    for h, w in ((900, 800), (2000, 1700), (256, 256), (200, 180)):
        img = cxr_like(h, w, seed=h)
        host = prepare_input(img, 256, [0.5], [0.25], 1)
        dev = prepare_on_device([img], 256, [0.5], [0.25], 1, cpu)[0].numpy()
        # shrinking: the same area weights and rounding as cv2.INTER_AREA, at most one grey level in a few
        # pixels; enlarging (images under 256 px, rare): a box where OpenCV interpolates, still within one level
        diff = np.abs(host - dev) * 0.25 * 255
        assert diff.max() <= 1.01, (h, w)
        if h > 256:
            assert (diff > 1e-3).mean() < 1e-3, (h, w)
        img16 = img.astype(np.uint16) * 40 + 300
        host = prepare_input(img16, 256, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 3)
        dev = prepare_on_device([img16], 256, [0.4, 0.5, 0.6], [0.2, 0.25, 0.3], 3, cpu)[0].numpy()
        assert np.abs(host - dev).max() < 2e-3


def test_jpegs_for_the_gpu_decoder_are_chosen_and_decoded_like_the_host():
    from lungmask_kit.accel import decode_jpegs, gray_jpeg_size
    from lungmask_kit.imaging import decode_image

    gray = cxr_like(300, 260, seed=1)
    data = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 92])[1].tobytes()
    progressive = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes()
    colour = cv2.imencode(".jpg", np.dstack([gray] * 3))[1].tobytes()
    png = cv2.imencode(".png", gray)[1].tobytes()
    exif = data[:2] + b"\xff\xe1\x00\x10Exif\x00\x00MM\x00*\x00\x00\x00\x08" + data[2:]
    assert gray_jpeg_size(data) == (260, 300) and gray_jpeg_size(progressive) == (260, 300)
    assert gray_jpeg_size(colour) is None and gray_jpeg_size(png) is None and gray_jpeg_size(exif) is None
    decoded = decode_jpegs([data, progressive, data[:200] + b"\xff\xd9"], torch.device("cpu"))
    assert decoded[2] is None  # the caller decodes it on the host, which says what is wrong
    for d, t in zip((data, progressive), decoded):
        assert np.array_equal(t.numpy(), decode_image(d).pixels)


def test_the_device_path_on_the_cpu_gives_the_host_paths_masks(tmp_path, random_weights, monkeypatch):
    """The GPU code path (native images to the device, resize/normalise there, JPEGs through torchvision's
    decoder) run on the CPU: every image comes out, with the host path's rows and masks."""
    from lungmask_kit.inference import Segmenter

    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        img = cxr_like(400 + 17 * i, 360, seed=i)
        cv2.imwrite(str(src / f"g{i}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(str(src / "colour.jpg"), np.dstack([cxr_like(380, 350, seed=9)] * 3))  # decoded on the host
    write_png(src / "p.png", cxr_like(390, 340, seed=7).astype(np.uint16) * 200)  # 16-bit, prepared on the device
    good = cv2.imencode(".jpg", cxr_like(300, 300, seed=8))[1].tobytes()
    (src / "cut.jpg").write_bytes(good[: len(good) // 2])  # truncated: refused before the device sees it
    host = run_segment(src, tmp_path / "host", SegmentOptions(weights=random_weights, batch_size=4, progress=False,
                                                              runtime="torch"))

    real_init = Segmenter.__init__

    def device_path(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.prepares_on_device = self.decodes_jpeg_on_device = True
        c = self.config
        self.runtime.prepare = (c.input_size, c.mean, c.std, c.in_channels)  # the torch runtime's CUDA input path

    monkeypatch.setattr(Segmenter, "__init__", device_path)
    dev = run_segment(src, tmp_path / "dev", SegmentOptions(weights=random_weights, batch_size=4, progress=False,
                                                            runtime="torch"))
    assert (dev.ok, dev.failed) == (host.ok, host.failed) == (8, 1)
    a, b = _table(tmp_path / "host").to_pandas(), _table(tmp_path / "dev").to_pandas()
    for column in ("path", "status", "error", "width", "height", "bit_depth", "source_channels", "sha256"):
        assert a[column].equals(b[column]), column
    for name in a.path[a.status == "ok"]:
        stem = Path(name).with_suffix(".png")
        m1 = cv2.imread(str(tmp_path / "host" / "masks" / stem), 0) > 0
        m2 = cv2.imread(str(tmp_path / "dev" / "masks" / stem), 0) > 0
        dice = 2 * (m1 & m2).sum() / max(m1.sum() + m2.sum(), 1)
        assert dice > 0.99, (name, dice)


def test_manifest_rows_refuse_unknown_columns():
    from lungmask_kit.manifest import SEGMENT_FIELDS, SegmentRow, to_table

    row = SegmentRow(path="a.png", status="ok")
    row.update(width=3)
    with pytest.raises(KeyError, match="widht"):
        row["widht"] = 3
    with pytest.raises(KeyError, match="lung_area"):
        row | {"lung_area": 0.3}
    with pytest.raises(KeyError, match="qc_reasons"):
        to_table([{"path": "a.png", "status": "ok", "qc_reasons": "x"}], SEGMENT_FIELDS)

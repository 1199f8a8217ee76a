"""Hostile inputs and hostile conditions: nothing hangs, crashes or blows up a run, and no run loses another's
rows. One test per finding of the adversarial probe (issue 16)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import pandas as pd
import pytest

from lungmask_kit.cli.app import main

from conftest import cxr_like, image_mask_pairs, write_png


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "lungmask_kit.cli.app", *map(str, args)]


def _segment(src, out, weights, *extra) -> int:
    return main(["segment", str(src), "-o", str(out), "-w", str(weights), "-q", *map(str, extra)])


def _manifest(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "manifest.parquet").set_index("path")


def _png(seed: int = 0, h: int = 120, w: int = 100) -> bytes:
    return cv2.imencode(".png", cxr_like(h, w, seed=seed))[1].tobytes()


# --- what is read ----------------------------------------------------------------------------------------------

def test_fifo_device_and_symlink_cycle_are_error_rows_not_hangs(tmp_path, random_weights):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.png").write_bytes(_png())
    os.mkfifo(src / "fifo.png")
    os.symlink("/dev/zero", src / "zero.png")
    os.symlink(src / "b.png", src / "a.png")
    os.symlink(src / "a.png", src / "b.png")  # a file-level symlink cycle
    out = tmp_path / "out"
    # in a subprocess with a timeout: a blocking open of the FIFO would hang the test, not fail it
    proc = subprocess.run(_cli("segment", src, "-o", out, "-w", random_weights, "-q"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    m = _manifest(out)
    assert m.loc["good.png", "status"] == "ok"
    assert "not a regular file (a FIFO)" in m.loc["fifo.png", "error"]
    assert "not a regular file (a character device)" in m.loc["zero.png", "error"]
    for name in ("a.png", "b.png"):
        assert "Too many levels of symbolic links" in m.loc[name, "error"]


def test_size_cap_counts_bytes_read(tmp_path):
    from lungmask_kit.fileio import InputReadError, read_regular_file

    p = tmp_path / "x.png"
    p.write_bytes(b"x" * 1000)
    assert len(read_regular_file(p, 1000)) == 1000
    with pytest.raises(InputReadError, match="too large"):
        read_regular_file(p, 999)


def _remove_tree(root: Path) -> None:
    """rm -r without recursion (shutil.rmtree, and pytest's clean-up of old tmp folders, recurse per level)."""
    stack, folders = [str(root)], []
    while stack:
        folder = stack.pop()
        folders.append(folder)
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            else:
                os.unlink(entry.path)
    for folder in reversed(folders):
        os.rmdir(folder)


@pytest.fixture
def deep_tmp(tmp_path):
    yield tmp_path
    for child in tmp_path.iterdir():
        _remove_tree(child)


def test_folder_deeper_than_the_recursion_limit(deep_tmp, random_weights):
    tmp_path = deep_tmp
    depth = sys.getrecursionlimit() + 100
    deep = str(tmp_path / "in")
    os.mkdir(deep)
    for _ in range(depth):  # one level at a time: os.makedirs itself recurses
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    Path(deep, "x.png").write_bytes(_png())
    (tmp_path / "in" / "top.png").write_bytes(_png(1))
    out = tmp_path / "out"
    assert _segment(tmp_path / "in", out, random_weights) == 0
    m = _manifest(out)
    assert len(m) == 2 and (m.status == "ok").all()
    assert (out / m.loc["/".join(["d"] * depth + ["x.png"]), "mask_path"]).is_file()


def test_out_inside_input_with_symlink_cycle_does_not_crash(tmp_path, random_weights):
    src = tmp_path / "in"
    src.mkdir()
    (src / "good.png").write_bytes(_png())
    os.symlink(src / "loop2.png", src / "loop1.png")
    os.symlink(src / "loop1.png", src / "loop2.png")
    assert _segment(src, src / "out", random_weights) == 1
    m = _manifest(src / "out")
    assert sorted(m.index) == ["good.png", "loop1.png", "loop2.png"]
    assert _segment(src, src / "out", random_weights) == 1  # our own outputs are never read back as inputs
    assert len(_manifest(src / "out")) == 3


def test_images_with_trailing_bytes_are_accepted(tmp_path, random_weights):
    src = tmp_path / "in"
    src.mkdir()
    img = cxr_like(120, 100)
    (src / "trailer.png").write_bytes(cv2.imencode(".png", img)[1].tobytes() + b"PACS trailer\x00" * 7)
    (src / "trailer.jpg").write_bytes(cv2.imencode(".jpg", img)[1].tobytes() + b"\x00\x00camera trailer")
    assert _segment(src, tmp_path / "out", random_weights) == 0
    assert (_manifest(tmp_path / "out").status == "ok").all()


# --- one kind of run, one live run, the union of --glob runs ----------------------------------------------------

def test_out_holding_another_commands_run_is_refused(tmp_path, small_corpus, random_weights, example_images, example_masks, capsys):
    seg_out = tmp_path / "seg"
    assert _segment(small_corpus, seg_out, random_weights) == 0
    before = (seg_out / "manifest.parquet").read_bytes()
    capsys.readouterr()
    variants = ["variants", "--images", str(example_images), "--masks", str(example_masks), "-o", str(seg_out), "-j", "1", "-q"]
    assert main(variants) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds a `lungkit segment` run" in err[0] and "--overwrite" in err[0]
    assert (seg_out / "manifest.parquet").read_bytes() == before
    var_out = tmp_path / "var"
    assert main([*variants[:-4], str(var_out), "-j", "1", "-q"]) == 0
    assert _segment(small_corpus, var_out, random_weights) == 2
    assert "holds a `lungkit variants` run" in capsys.readouterr().err
    # --overwrite replaces it: the variants rows and their outputs go, the segment rows come
    assert _segment(small_corpus, var_out, random_weights, "--overwrite") == 0
    m = _manifest(var_out)
    assert len(m) == 3 and set(m.index) == {p.name for p in small_corpus.iterdir()}
    assert len(list((var_out / "lungs").glob("*.png"))) == 3


def test_runs_with_different_globs_keep_every_earlier_row(tmp_path, random_weights):
    src = tmp_path / "in"
    for split in ("train", "test"):
        for i in range(2):
            write_png(src / split / f"{split}{i}.png", cxr_like(100, 90, seed=i))
    out = tmp_path / "out"
    assert _segment(src, out, random_weights, "--glob", "train/*") == 0
    assert _segment(src, out, random_weights, "--glob", "test/*") == 0
    m = _manifest(out)
    assert sorted(m.index) == ["test/test0.png", "test/test1.png", "train/train0.png", "train/train1.png"]
    assert all((out / p).is_file() for p in m.mask_path)


def test_a_second_live_run_is_refused_and_a_dead_runs_lock_is_taken_over(tmp_path, small_corpus, random_weights, capsys):
    from lungmask_kit.runfolder import LOCK_FILE, RunLock

    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out):
        assert _segment(small_corpus, out, random_weights) == 2
    err = capsys.readouterr().err
    assert "another lungkit run (pid" in err and err.count("\n") == 1
    assert not (out / "manifest.parquet").exists()
    # the lock file of a SIGKILLed run: its holder is gone, so the lock is free
    proc = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                             "from lungmask_kit.runfolder import RunLock; from pathlib import Path;"
                             "l = RunLock(Path(sys.argv[2])).__enter__(); print('locked', flush=True); time.sleep(60)",
                             str(Path(__file__).parents[1]), str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    assert _segment(small_corpus, out, random_weights) == 2
    proc.kill()
    proc.wait()
    assert (out / LOCK_FILE).read_text().startswith("pid ")
    assert _segment(small_corpus, out, random_weights) == 0


def test_two_concurrent_processes_into_one_out_never_lose_rows(tmp_path, random_weights):
    src = tmp_path / "in"
    for i in range(6):
        write_png(src / f"x{i}.png", cxr_like(120, 100, seed=i))
    out = tmp_path / "out"
    procs = [subprocess.Popen(_cli("segment", src, "-o", out, "-w", random_weights, "-q"), stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes in ([0, 0], [0, 2]), results  # the second finds the first done, or is refused while it runs
    for rc, err in results:
        assert "Traceback" not in err and (rc == 0 or "another lungkit run" in err)
    m = _manifest(out)
    assert len(m) == 6 and (m.status == "ok").all()


# --- paths from a manifest, output names ------------------------------------------------------------------------

def test_manifest_paths_cannot_read_or_write_outside(tmp_path, small_corpus, random_weights):
    seg_out = tmp_path / "seg"
    assert _segment(small_corpus, seg_out, random_weights) == 0
    import pyarrow.parquet as pq

    table = pq.read_table(seg_out / "manifest.parquet")
    rows = table.to_pylist()
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(5))
    rows[0]["path"] = "../secret.png"
    rows[1]["mask_path"] = "../../" + rows[1]["mask_path"]
    rows[2]["path"] = str(secret)
    hostile = tmp_path / "hostile" / "manifest.parquet"
    hostile.parent.mkdir()
    pq.write_table(pa_table(rows, table), hostile)
    for name in ("masks", "lungs", "nolungs"):
        os.symlink(seg_out / name, hostile.parent / name)
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "var"
    assert main(["variants", str(hostile), "-o", str(out), "-j", "1", "-q"]) == 1
    m = _manifest(out)
    assert (m.status == "error").all()
    assert all("leaves the input folder" in e for e in m.error)
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(out == p or out in p.parents for p in created)


def pa_table(rows, like):
    import pyarrow as pa

    return pa.Table.from_pylist(rows, schema=like.schema)


def test_output_names_never_collide(tmp_path, random_weights):
    src = tmp_path / "in"
    src.mkdir()
    for name, seed in (("x.png", 1), ("x.jpg", 2), ("x.jpg.png", 3), ("X.PNG", 4)):
        img = cxr_like(100 + 10 * seed, 90, seed=seed)
        ok, buf = cv2.imencode(Path(name).suffix.lower(), img)
        (src / name).write_bytes(buf.tobytes())
    out = tmp_path / "out"
    assert _segment(src, out, random_weights) == 0
    m = _manifest(out)
    assert len(m) == 4 and m.mask_path.str.lower().is_unique
    for path, row in m.iterrows():  # each mask has its own image's size: nothing was overwritten
        mask = cv2.imread(str(out / row.mask_path), cv2.IMREAD_UNCHANGED)
        assert mask.shape == (row.height, row.width), path


def test_an_output_path_over_the_limit_is_an_error_row(tmp_path, random_weights):
    src = tmp_path / "in"
    src.mkdir()
    stem = "a" * 249
    (src / f"{stem}.png").write_bytes(_png(1))
    (src / f"{stem}.jpg").write_bytes(cv2.imencode(".jpg", cxr_like(100, 90))[1].tobytes())  # forces {name}.png: 257 bytes
    (src / "fine.png").write_bytes(_png(2))
    out = tmp_path / "out"
    assert _segment(src, out, random_weights) == 1
    m = _manifest(out)
    assert m.loc["fine.png", "status"] == "ok"
    assert all("output name too long" in m.loc[f"{stem}{ext}", "error"] for ext in (".png", ".jpg"))


# --- damaged manifests, model configs ---------------------------------------------------------------------------

@pytest.mark.parametrize("overwrite", [False, True])
def test_a_truncated_manifest_is_set_aside_and_rebuilt(tmp_path, small_corpus, random_weights, capsys, overwrite):
    out = tmp_path / "out"
    assert _segment(small_corpus, out, random_weights) == 0
    data = (out / "manifest.parquet").read_bytes()
    (out / "manifest.parquet").write_bytes(data[: len(data) // 2])
    assert _segment(small_corpus, out, random_weights, *(["--overwrite"] if overwrite else [])) == 0
    assert "manifest.parquet is damaged" in capsys.readouterr().err
    assert len(_manifest(out)) == 3 and list((out / ".lungkit-damaged").iterdir())
    assert _segment(small_corpus, out, random_weights) == 0  # and the next run is clean


def test_a_truncated_part_file_is_set_aside(tmp_path, small_corpus, random_weights, capsys):
    from lungmask_kit.manifest import PARTS_DIR

    out = tmp_path / "out"
    assert _segment(small_corpus, out, random_weights) == 0
    parts = out / PARTS_DIR
    parts.mkdir()
    (parts / "part-000000.parquet").write_bytes(b"PAR1 truncated")
    assert _segment(small_corpus, out, random_weights) == 0
    assert "part-000000.parquet is damaged" in capsys.readouterr().err
    assert len(_manifest(out)) == 3


@pytest.mark.parametrize("change, message", [
    ({"mean": 0.5}, "mean must be a list of numbers"),
    ({"input_size": 0}, "input_size must be an integer"),
    ({"input_size": 100}, "multiple of 32"),
    ({"std": [0.0]}, "std must be positive"),
    ({"threshold": 1.5}, "threshold must be a number between 0 and 1"),
    ({"in_channels": "1"}, "in_channels must be an integer"),
])
def test_bad_model_configs_are_exit_4_at_load(tmp_path, small_corpus, random_weights, capsys, change, message):
    cfg = json.loads(random_weights.with_suffix(".json").read_text())
    cfg.update(change)
    weights = tmp_path / "bad.safetensors"
    weights.write_bytes(random_weights.read_bytes())
    weights.with_suffix(".json").write_text(json.dumps(cfg))
    assert _segment(small_corpus, tmp_path / "out", weights) == 4
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "out" / "manifest.parquet").exists()


# --- signals, stale outputs, memory, labels ---------------------------------------------------------------------

@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_stop_cleanly_and_say_how_to_resume(tmp_path, random_weights, sig, code):
    src = tmp_path / "in"
    for i in range(40):
        write_png(src / f"x{i:02d}.png", cxr_like(300, 280, seed=i))
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("segment", src, "-o", out, "-w", random_weights, "-b", "4", "-q"),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".manifest-parts").glob("part-*.parquet")):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == code, err
    assert "interrupted; run the same command again to resume" in err and "Traceback" not in err
    assert not list(out.rglob(".lungkit-tmp-*"))
    assert _segment(src, out, random_weights, "-b", "4") == 0
    m = _manifest(out)
    assert len(m) == 40 and (m.status == "ok").all()


def test_outputs_of_inputs_that_left_are_removed(tmp_path, small_corpus, random_weights, capsys):
    out = tmp_path / "out"
    assert _segment(small_corpus, out, random_weights) == 0
    gone = sorted(small_corpus.iterdir())[0]
    row = _manifest(out).loc[gone.name]
    gone.unlink()
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights)]) == 0
    assert "removed (input gone)    1" in capsys.readouterr().out
    assert gone.name not in _manifest(out).index
    for column in ("mask_path", "lungs_path", "nolungs_path"):
        assert not (out / row[column]).exists()
    assert len(list((out / "masks").glob("*.png"))) == 2


def test_decoded_images_are_bounded_by_bytes(tmp_path, random_weights, monkeypatch):
    import lungmask_kit.segment as seg

    src = tmp_path / "in"
    for i in range(24):
        write_png(src / f"x{i:02d}.png", cxr_like(1000, 1000, seed=i))  # 4 MB in flight each (image + outputs)
    peak = {"held": 0}
    import lungmask_kit.engines.local as engine

    original = engine.ByteBudget.take

    def take(self, n):
        original(self, n)
        peak["held"] = max(peak["held"], self.held)

    monkeypatch.setattr(engine.ByteBudget, "take", take)
    options = seg.SegmentOptions(weights=random_weights, batch_size=8, workers=4, max_decoded_mb=16, progress=False)
    s = seg.run_segment(src, tmp_path / "out", options)
    assert s.ok == 24
    one = 1000 * 1000 * 4
    # the budget (4 such images), overshot by at most the first two decodes; by count alone (prefetch
    # 2 * 8 + 4) twenty of them (80 MB) would be held
    assert peak["held"] <= (16 << 20) + one


def test_budget_lets_one_image_through_however_large():
    from lungmask_kit.engines.local import ByteBudget

    b = ByteBudget(1000)
    assert b.room_for(0) and b.room_for(1) and not b.room_for(2)  # nothing measured yet: two at a time
    b.take(5000)
    assert not b.room_for(0)
    b.give_back(5000)
    assert b.held == 0 and not b.room_for(0)  # the largest seen so far (5000) is the estimate: the run forces one
    b2 = ByteBudget(1000)
    b2.take(100)
    assert b2.room_for(8) and not b2.room_for(9)  # 100 held + (8 + 1) x 100 = 1000


def test_conflicting_label_rows_are_reported_as_conflicts(tmp_path, small_corpus, random_weights, capsys):
    names = sorted(p.name for p in small_corpus.iterdir())
    labels = tmp_path / "labels.csv"
    labels.write_text(f"path,label,patient_id\n{names[0]},covid,p1\n{names[0]},negative,p1\n"
                      f"{names[1]},covid,p2\n{names[1]},covid,p2\n")
    out = tmp_path / "out"
    assert _segment(small_corpus, out, random_weights, "--labels", labels) == 0
    err = capsys.readouterr().err
    assert "2 label row(s) disagree about one image" in err and "match no image" not in err
    m = _manifest(out)
    assert pd.isna(m.loc[names[0], "label"]) and m.loc[names[1], "label"] == "covid"
    report = pd.read_csv(out / "unmatched_labels.csv")
    assert report.problem.tolist() == ["conflict", "conflict"] and set(report.label) == {"covid", "negative"}


def test_full_disk_while_writing_the_manifest_is_one_line(tmp_path, small_corpus, random_weights, monkeypatch, capsys):
    import errno

    import lungmask_kit.manifest as manifest

    out = tmp_path / "out"
    assert _segment(small_corpus, out, random_weights) == 0
    before = (out / "manifest.parquet").read_bytes()
    capsys.readouterr()

    def full(path, data, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest, "atomic_write_bytes", full)
    assert _segment(small_corpus, out, random_weights, "--overwrite") == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "warning" not in ln]
    assert len(err) == 1 and "disk full" in err[0]
    assert (out / "manifest.parquet").read_bytes() == before
    monkeypatch.undo()
    assert _segment(small_corpus, out, random_weights) == 0


def test_a_label_file_that_is_not_csv_is_one_line(tmp_path, small_corpus, random_weights, capsys):
    labels = tmp_path / "labels.csv"
    labels.write_bytes(b"path,label\nx.png,\"" + b"x" * 300_000 + b"\"\n")  # over csv's field size limit
    assert _segment(small_corpus, tmp_path / "out", random_weights, "--labels", labels) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a readable CSV" in err[0]


def test_outputs_follow_the_umask(tmp_path, small_corpus, random_weights):
    import stat

    import lungmask_kit.fileio as fileio

    if fileio.UMASK != 0o022:
        pytest.skip(f"the test process runs with umask {fileio.UMASK:03o}")
    out = tmp_path / "out"
    assert _segment(small_corpus, out, random_weights) == 0
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name == "manifest.parquet" for p in files) and len(files) > 9
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) == 0o644, p
    for d in [p for p in out.rglob("*") if p.is_dir()]:
        assert stat.S_IMODE(d.stat().st_mode) == 0o755, d


def test_variants_stops_cleanly_on_sigterm(tmp_path):
    images, masks = image_mask_pairs(tmp_path, 60)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("variants", "--images", images, "--masks", masks, "-o", out, "-j", "2", "-q"),
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any((out / "lungs").glob("*.png")):
        time.sleep(0.02)
    assert proc.poll() is None, "variants finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == 143 and "interrupted; run the same command again to resume" in err and "Traceback" not in err, err
    assert not list(out.rglob(".lungkit-tmp-*"))
    assert main(["variants", "--images", str(images), "--masks", str(masks), "-o", str(out), "-j", "2", "-q"]) == 0
    m = _manifest(out)
    assert len(m) == 60 and (m.status == "ok").all()


def _corrupt_jpeg(path: Path, seed: int) -> None:
    """A JPEG whose scan data is damaged: libjpeg decodes it and prints 'Corrupt JPEG data' to fd 2 itself."""
    ok, buf = cv2.imencode(".jpg", cxr_like(seed=seed))
    data = bytearray(buf.tobytes())
    for i in range(700, 3000, 41):
        data[i] = 0xFF if data[i] else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("command", ["segment", "variants"])
def test_c_decoder_messages_are_counted_not_printed(tmp_path, random_weights, command):
    src = tmp_path / "in"
    for i in range(5):
        _corrupt_jpeg(src / f"c{i}.jpg", i)
    write_png(src / "fine.png", cxr_like(seed=9))
    args = ["segment", src, "-o", tmp_path / "seg", "-w", random_weights]
    if command == "variants":
        assert subprocess.run(_cli(*args, "-q"), capture_output=True).returncode == 0
        args = ["variants", tmp_path / "seg" / "manifest.parquet", "-o", tmp_path / "var", "-j", "2"]
    # in a subprocess: the C library writes to the process's real stderr, which pytest's capture cannot see
    proc = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Corrupt JPEG data" not in proc.stderr.replace("the first: Corrupt JPEG data", "")
    counted = [line for line in proc.stderr.splitlines() if "warning(s) during the run were counted" in line]
    assert len(counted) == 1 and "5 warning(s)" in counted[0] and "Corrupt JPEG data" in counted[0]
    assert "100%" in proc.stderr  # the progress bar still reaches the terminal through the filter


def test_a_decoder_message_right_after_a_progress_bar_update_is_counted():
    """libjpeg can write straight after tqdm's "\\r..." update (no newline between them), and a pipe read can
    end anywhere: the message is still counted whole and the bar still shown (a CI run once printed it)."""
    from lungmask_kit.decoder_warnings import WarningTally, _DecoderLineFilter

    stream = b"\r  0%|    | 0/6 [00:00<?, ?img/s]Corrupt JPEG data: premature end of data segment\n\r 50%|##| 3/6\n"
    for cut in range(1, len(stream)):
        tally = WarningTally(c_stderr=False)
        shown = []
        f = _DecoderLineFilter(tally)
        f._forward = shown.append
        rest = f._drain(f._drain(stream[:cut]) + stream[cut:])
        assert rest == b"" and tally.count == 1, cut
        assert tally.first.startswith("Corrupt JPEG data: premature end"), cut
        assert b"".join(shown) == b"\r  0%|    | 0/6 [00:00<?, ?img/s]\r 50%|##| 3/6\n", cut


# --- issue 23: what segment does not read, and folder mix-ups ----------------------------------------------------

def test_segment_counts_what_it_ignores_and_never_reads_an_earlier_run(tmp_path, small_corpus, random_weights, capsys):
    for name in ("a.webp", "b.webp", "c.gif", "d.jp2", "e.pdf", "notes"):
        (small_corpus / name).write_bytes(b"whatever")
    old = tmp_path / "old-run"
    assert _segment(small_corpus, old, random_weights) == 0
    shutil.copytree(old, small_corpus / "old-run")  # an earlier run kept inside the input folder
    capsys.readouterr()
    assert main(["segment", str(small_corpus), "-o", str(tmp_path / "new"), "-w", str(random_weights)]) == 0
    captured = capsys.readouterr()
    ignored = " ".join(captured.out.split())
    assert "6 file(s): 2 .webp" in ignored and all(k in ignored for k in ("1 .gif", "1 .jp2", "1 .pdf", "1 (no extension)"))
    assert captured.err.count("not read: 1 lungkit output folder") == 1
    assert len(_manifest(tmp_path / "new")) == 3  # the 3 images, none of the old run's masks


def test_folder_mix_ups_get_the_right_message(tmp_path, small_corpus, random_weights, capsys):
    image = next(small_corpus.iterdir())
    assert _segment(image, tmp_path / "o1", random_weights) == 2
    assert "is a file: give the folder" in capsys.readouterr().err
    outer = tmp_path / "outer"
    shutil.copytree(small_corpus, outer / "images")
    assert _segment(outer / "images", outer, random_weights) == 2
    assert "lies inside the output folder" in capsys.readouterr().err


def test_a_corrected_view_label_takes_effect_on_the_re_run(tmp_path, small_corpus, random_weights):
    names = sorted(p.name for p in small_corpus.iterdir())
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label,view\n" + "".join(f"{n},x,{'L' if i == 0 else 'PA'}\n" for i, n in enumerate(names)))
    out = tmp_path / "out"
    assert _segment(small_corpus, out, random_weights, "--labels", labels, "--min-lung-fraction", "0") == 0
    assert "lateral view" in (_manifest(out).loc[names[0], "qc_reason"] or "")
    labels.write_text("path,label,view\n" + "".join(f"{n},x,PA\n" for n in names))  # the curator corrects it
    assert _segment(small_corpus, out, random_weights, "--labels", labels, "--min-lung-fraction", "0") == 0
    m = _manifest(out)
    assert m.loc[names[0], "view"] == "PA" and pd.isna(m.loc[names[0], "qc_reason"])  # no reason left

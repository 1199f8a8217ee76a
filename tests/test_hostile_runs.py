"""Hostile datasets, manifests and neighbours for the commands that read a finished run (report, publish,
evaluate, classify, variants DATASET): one test per finding of issue 26. The runs are variants runs of synthetic
image-mask pairs (no model), tampered the way a downloaded dataset or manifest could be."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lungmask_kit.cli.app import main
from lungmask_kit.fileio import InputReadError
from lungmask_kit.imaging import read_decoded
from lungmask_kit.qc import kind_reasons, reason_counts, split_reasons
from lungmask_kit.report import ReportOptions, build_report
from lungmask_kit.report.pages import sheet_stem

from conftest import cxr_like, image_mask_pairs, write_dicom, write_png


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """root/images, root/masks: 6 synthetic CXRs and their masks."""
    root = tmp_path_factory.mktemp("pairs")
    image_mask_pairs(root, 6, 300, 260)
    return root


@pytest.fixture
def run(tmp_path, pairs) -> Path:
    """A finished variants run (own copies of the pairs, so a test may damage them) with labels and patient ids."""
    shutil.copytree(pairs, tmp_path / "data")
    out = tmp_path / "run"
    assert main(["variants", "--images", str(tmp_path / "data" / "images"), "--masks", str(tmp_path / "data" / "masks"),
                 "-o", str(out), "-j", "1", "-q"]) == 0
    tamper(out / "manifest.parquet", label=lambda i, r: "covid" if i % 2 else "negative",
           patient_id=lambda i, r: f"MRN{1000 + i // 2}", study_uid=lambda i, r: f"1.2.840.99.{i}")
    return out


def tamper(manifest: Path, **columns) -> None:
    """Rewrite some columns of a manifest (or a dataset shard) in place, keeping its schema metadata: each
    keyword is a column and a function (row number, row) -> value; a column the file lacks is added."""
    table = pq.read_table(manifest)
    rows = table.to_pylist()
    for name, make in columns.items():
        values = [make(i, r) for i, r in enumerate(rows)]
        field = table.schema.field(name) if name in table.column_names else pa.field(name, pa.infer_type(values))
        array = pa.array(values, field.type)
        if name in table.column_names:
            table = table.set_column(table.schema.get_field_index(name), field, array)
        else:
            table = table.append_column(field, array)
    pq.write_table(table.replace_schema_metadata(pq.read_schema(manifest).metadata), manifest)


# --- 1. writes outside -o ---------------------------------------------------------------------------------------

def test_variants_from_a_hostile_dataset_writes_only_inside_out(tmp_path, run, capsys):
    ds = tmp_path / "ds"
    assert main(["publish", str(run), "-o", str(ds), "--masks-only", "--include-flagged", "-q"]) == 0
    shard = next((ds / "data").glob("*.parquet"))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    tamper(shard, lungs_path=lambda i, r: "lungs/../../../victim.txt",
           mask_rle=lambda i, r: {"size": [70000, 70000], "counts": r["mask_rle"]["counts"]} if i == 1 else r["mask_rle"])
    before = set(tmp_path.rglob("*"))
    out = tmp_path / "var"
    code = main(["variants", str(ds), "--input-root", str(tmp_path / "data" / "images"), "-o", str(out), "-j", "1", "-q"])
    assert code == 1  # one error row (the RLE), the batch went on
    assert victim.read_text() == "keep me"
    created = set(tmp_path.rglob("*")) - before
    assert created and all(p == out or out in p.parents for p in created)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    bad = [r for r in rows if r["status"] == "error"]
    assert len(bad) == 1 and ("out of bounds" in bad[0]["error"] or "differs from the image" in bad[0]["error"])
    assert sum(r["status"] == "ok" for r in rows) == len(rows) - 1


# --- 2. concurrent builds of one folder ------------------------------------------------------------------------

HOLD = """
import sys, time
from pathlib import Path
from lungmask_kit.fileio import staged_folder
with staged_folder(Path(sys.argv[1]), Path(sys.argv[2]), ".m", "a test", resumable=sys.argv[3] == "1") as s:
    print("held", flush=True)
    time.sleep(30)
"""


@pytest.mark.parametrize("command, marker", [("publish", "1"), ("report", "0")])
def test_a_second_build_of_one_folder_is_refused_while_the_first_runs(tmp_path, run, capsys, command, marker):
    dest = tmp_path / "dest"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(dest), str(run), marker], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main([command, str(run), "-o", str(dest), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is building" in err and str(holder.pid) in err
    finally:
        holder.kill()
        holder.wait()
    assert main([command, str(run), "-o", str(dest), "-q"]) == 0  # the dead holder's lock is gone with it
    assert not list(tmp_path.glob(".dest.lungkit-*"))  # no lock, no staging folder left beside it


def test_two_publishes_at_once_leave_one_whole_dataset(tmp_path, run):
    ds = tmp_path / "ds"
    cmd = [sys.executable, "-m", "lungmask_kit.cli.app", "publish", str(run), "-o", str(ds), "-q"]
    procs = [subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(code in (0, 2) for code, _ in results) and any(code == 0 for code, _ in results)
    for code, err in results:
        assert code == 0 or (len(err.strip().splitlines()) == 1 and "Traceback" not in err)
    listed = {line.split("  ", 1)[1] for line in (ds / "SHA256SUMS").read_text().splitlines()}
    on_disk = {p.relative_to(ds).as_posix() for p in ds.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert listed == on_disk  # no stray shard beside the listed ones
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=ds).returncode == 0


WRITE = """
import sys, time
from pathlib import Path
from lungmask_kit.runfolder import RunLock
with RunLock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(30)
"""

READ = """
import sys, time
from lungmask_kit.runfolder import reading_run
with reading_run(sys.argv[1], "publish"):
    print("held", flush=True)
    time.sleep(30)
"""


@pytest.mark.parametrize("command", ["publish", "report"])
def test_a_run_being_rewritten_is_not_read_and_one_being_read_is_not_rewritten(tmp_path, run, capsys, command):
    # publishing while `variants --overwrite` re-derived gave rows whose lungs were not image AND mask
    writer = subprocess.Popen([sys.executable, "-c", WRITE, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        assert main([command, str(run), "-o", str(tmp_path / "dest"), "-q"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is being written by another lungkit run" in err and str(writer.pid) in err
    finally:
        writer.kill()
        writer.wait()
    assert not (tmp_path / "dest").exists()
    reader = subprocess.Popen([sys.executable, "-c", READ, str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "held"
        data = run.parent / "data"
        code = main(["variants", "--images", str(data / "images"), "--masks", str(data / "masks"), "-o", str(run),
                     "--overwrite", "-j", "1", "-q"])
        assert code == 2 and "publish, reading it" in capsys.readouterr().err
    finally:
        reader.kill()
        reader.wait()


# --- 3. reads outside the run ----------------------------------------------------------------------------------

def test_paths_out_of_the_run_are_never_followed(tmp_path, run, capsys):
    secret = tmp_path / "secret.png"
    outside_mask = tmp_path / "outside-mask.png"
    write_png(outside_mask, np.full((300, 260), 255, np.uint8))
    manifest = run / "manifest.parquet"
    tamper(manifest, path=lambda i, r: str(secret) if i == 0 else ("../secret.png" if i == 1 else r["path"]),
           mask_path=lambda i, r: "../../outside-mask.png" if i == 2 else r["mask_path"])
    write_png(secret, cxr_like(500, 500, seed=99))  # if it were drawn, an overlay would be 500 px square
    build_report(run, tmp_path / "rep", ReportOptions(progress=False, sample=10))
    pages = "".join(p.read_text() for p in (tmp_path / "rep").glob("*.html"))
    assert pages.count("leaves its folder (absolute or with ..): not followed") >= 2
    import cv2

    sizes = {cv2.imread(str(p)).shape[:2] for p in (tmp_path / "rep" / "img").glob("*-large.jpg")}
    assert sizes == {(300, 260)}
    assert main(["publish", str(run), "-o", str(tmp_path / "ds"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "leaves its folder" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "ds").exists()
    truth = tmp_path / "data" / "masks"
    assert main(["evaluate", str(run), "--truth", str(truth), "-o", str(tmp_path / "ev"), "-q"]) == 1  # error rows
    rows = {r["path"]: r for r in pq.read_table(tmp_path / "ev" / "metrics.parquet").to_pylist()}
    third = pq.read_table(manifest).column("path")[2].as_py()
    assert rows[third]["status"] == "error" and "leaves its folder" in rows[third]["error"]


def test_a_missing_input_root_is_refused(tmp_path, run, capsys):
    for command in ("report", "publish"):
        assert main([command, str(run), "-o", str(tmp_path / command), "--input-root", str(tmp_path / "nowhere"), "-q"]) == 2
        assert "--input-root" in capsys.readouterr().err


# --- 4. hangs and memory ---------------------------------------------------------------------------------------

def test_fifo_and_device_files_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "mask.png"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.png"
    os.symlink("/dev/zero", zero)
    for path, kind in ((fifo, "FIFO"), (zero, "character device")):
        t0 = time.perf_counter()
        with pytest.raises(InputReadError, match=kind):
            read_decoded(path)
        assert time.perf_counter() - t0 < 5


MEMORY_LIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from lungmask_kit.cli.app import main
sys.exit(main(sys.argv[1:]))
"""


def test_fifo_and_dev_zero_masks_under_a_memory_limit(tmp_path, run):
    masks = tmp_path / "data" / "masks"
    shutil.copytree(masks, tmp_path / "truth")
    (masks / "v00.png").unlink()
    os.mkfifo(masks / "v00.png")
    (masks / "v01.png").unlink()
    os.symlink("/dev/zero", masks / "v01.png")
    for argv in (["report", str(run), "-o", str(tmp_path / "rep"), "--sample", "10", "-q"],
                 ["evaluate", str(run), "--truth", str(tmp_path / "truth"), "-o", str(tmp_path / "ev"), "-q"]):
        result = subprocess.run([sys.executable, "-c", MEMORY_LIMIT, *argv], capture_output=True, text=True, timeout=240)
        assert result.returncode == (1 if argv[0] == "evaluate" else 0), result.stderr  # evaluate: 2 error rows
        assert "Traceback" not in result.stderr
    errors = [r["error"] for r in pq.read_table(tmp_path / "ev" / "metrics.parquet").to_pylist() if r["status"] == "error"]
    assert len(errors) == 2 and any("FIFO" in e for e in errors) and any("device" in e for e in errors)


def test_an_interrupt_cancels_the_queued_overlays(tmp_path, run, monkeypatch):
    from lungmask_kit.manifest import open_run
    from lungmask_kit.report import render

    calls = []

    def slow(data, i, folder, options):
        calls.append(i)
        if len(calls) == 1:
            raise KeyboardInterrupt
        time.sleep(0.05)
        return {}

    monkeypatch.setattr(render, "_render_one", slow)
    data = open_run(run)
    with pytest.raises(KeyboardInterrupt):
        render.render_cards(data, list(range(120)), tmp_path / "img", ReportOptions(workers=1, progress=False))
    assert len(calls) <= 2  # not the 120 queued


# --- 5. QC reasons ---------------------------------------------------------------------------------------------

def test_qc_reasons_never_contain_the_separator_and_quote_values_short():
    long_value = "CT " + "x" * 300
    reasons = kind_reasons({"modality": long_value, "view": "LL; lateral"})
    assert len(reasons) == 2
    assert all("; " not in r for r in reasons)
    assert split_reasons("; ".join(reasons)) == reasons
    assert max(len(r) for r in reasons) < 120


def test_reasons_of_older_manifests_are_parsed_whole():
    old = "not a radiograph (modality CT; CR or DX expected); lateral view (view L); the model segments frontal views"
    assert split_reasons(old) == ["not a radiograph (modality CT; CR or DX expected)",
                                  "lateral view (view L); the model segments frontal views"]
    assert set(reason_counts([old, "no lung detected"])) == {"not a radiograph (modality)", "lateral view", "no lung"}


def test_report_sheets_of_long_and_non_ascii_reasons_are_short_unique_and_stable(tmp_path, run):
    values = ["CT" + "y" * 300, "Tomographie µ", "Tomographie ü", "断层扫描", "断层扫描2"]
    tamper(run / "manifest.parquet", qc_pass=lambda i, r: False,
           qc_reason=lambda i, r: f"custom check {values[i % len(values)]}" if i < 5 else
           "not a radiograph (modality CT; CR or DX expected)")
    summary = build_report(run, tmp_path / "rep", ReportOptions(progress=False))
    sheets = sorted(p.name for p in (tmp_path / "rep").glob("flagged-*.html"))
    assert len(sheets) == 6 and max(len(s) for s in sheets) <= 64
    assert not any("expected" in s and "not-a-radiograph" not in s for s in sheets)
    assert sheet_stem(values[1]) != sheet_stem(values[2]) and sheet_stem(values[3]) == sheet_stem(values[3])
    assert summary.flagged == 6


# --- 6. privacy ------------------------------------------------------------------------------------------------

def test_publish_pseudonymises_identifiers_unless_asked(tmp_path, run, capsys):
    ds = tmp_path / "ds"
    assert main(["publish", str(run), "-o", str(ds), "--include-flagged"]) == 0
    assert "pseudonyms" in capsys.readouterr().out
    table = pa.concat_tables([pq.read_table(p) for p in sorted((ds / "data").glob("*.parquet"))])
    ids = table.column("patient_id").to_pylist()
    assert all(v.startswith("anon-") for v in ids) and len(set(ids)) == 3  # two images per patient stay together
    blob = b"".join(p.read_bytes() for p in ds.rglob("*") if p.is_file())
    assert b"MRN100" not in blob and b"1.2.840.99." not in blob
    assert "pseudonyms" in (ds / "README.md").read_text()
    kept = tmp_path / "kept"
    assert main(["publish", str(run), "-o", str(kept), "--include-flagged", "--keep-identifiers", "-q"]) == 0
    table = pa.concat_tables([pq.read_table(p) for p in sorted((kept / "data").glob("*.parquet"))])
    assert set(table.column("patient_id").to_pylist()) == {"MRN1000", "MRN1001", "MRN1002"}


def test_a_multi_valued_patient_id_is_text_not_a_list(tmp_path):
    path = write_dicom(tmp_path / "a.dcm", cxr_like(64, 64), PatientID="A1\\B2")
    assert read_decoded(path).header["patient_id"] == "A1\\B2"


def test_the_card_escapes_label_values_and_the_licence(tmp_path, run):
    tamper(run / "manifest.parquet", label=lambda i, r: "## Injected section\n- [click](http://x)" if i == 0 else r["label"],
           convention=lambda i, r: "`v7\n## Convention section <b>x</b> [y](http://z)" if i == 1 else "jsrt")
    ds = tmp_path / "ds"
    assert main(["publish", str(run), "-o", str(ds), "--include-flagged", "--license", "mit\nextra: injected", "-q"]) == 0
    card = (ds / "README.md").read_text()
    header = card.split("---")[1]
    assert 'license: "other"' in header and "extra" not in header
    assert "\n## Injected section" not in card and "](http://x)" not in card
    assert "\n## Convention section" not in card and "<b>" not in card and "](http://z)" not in card
    assert "(not a convention lungkit knows)" in card and "`jsrt`: the visible lung fields" in card


# --- 7. silently wrong pictures --------------------------------------------------------------------------------

def test_report_checks_the_originals_and_says_when_a_mask_is_missing(tmp_path, run):
    images, masks = tmp_path / "data" / "images", tmp_path / "data" / "masks"
    write_png(images / "v00.png", cxr_like(300, 260, seed=77))  # another picture, same size, same name
    (masks / "v01.png").unlink()
    summary = build_report(run, tmp_path / "rep", ReportOptions(progress=False, sample=10))
    pages = "".join(p.read_text() for p in (tmp_path / "rep").glob("*.html"))
    assert "sha256 differs" in pages
    assert "mask not readable" in pages
    assert summary.unrendered >= 1 and summary.no_outline >= 1


# --- 8. OS errors on an output folder --------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["report", "publish", "evaluate", "classify"])
def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, run, capsys, command):
    extra = {"evaluate": ["--truth", str(tmp_path / "data" / "masks")], "classify": ["--epochs", "1"]}.get(command, [])
    assert main([command, str(run), "-o", "/proc/lungkit-test/out", *extra, "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lungkit: error: cannot write")


def test_a_full_disk_while_publishing_is_one_line_and_kept_for_resume(tmp_path, run, capsys, monkeypatch):
    import errno

    from lungmask_kit.publish import build

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build, "write_sha256sums", full)
    assert main(["publish", str(run), "-o", str(tmp_path / "ds"), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err and "resumes" in err
    assert (tmp_path / ".ds.lungkit-partial").is_dir() and not (tmp_path / "ds").exists()


# --- 9. smaller findings ---------------------------------------------------------------------------------------

def test_a_shard_record_that_is_json_but_not_a_record_is_a_rerun_not_a_traceback(tmp_path, small_corpus, random_weights, capsys):
    out = tmp_path / "out"
    assert main(["segment", str(small_corpus), "-o", str(out), "-w", str(random_weights), "--shard", "1/2", "-q"]) == 0
    (out / ".manifest-parts" / "shard-0002of0002.json").write_text("[1, 2, 3]")
    capsys.readouterr()
    assert main(["merge", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "2/2 did not finish" in err and "Traceback" not in err


def test_long_split_values_and_small_shards_and_cropped_variants_publish(tmp_path, pairs):
    out = tmp_path / "crop"
    assert main(["variants", "--images", str(pairs / "images"), "--masks", str(pairs / "masks"), "-o", str(out), "--crop",
                 "-j", "1", "-q"]) == 0
    tamper(out / "manifest.parquet", split=lambda i, r: "s" * 300 if i < 3 else "t" * 299 + "ü")
    ds = tmp_path / "ds"
    assert main(["publish", str(out), "-o", str(ds), "--include-flagged", "--shard-mb", "1", "-q"]) == 0
    names = [p.name for p in (ds / "data").glob("*.parquet")]
    assert len({n.split("-0")[0] for n in names}) == 2 and max(len(n) for n in names) < 100
    card = (ds / "README.md").read_text()
    assert "cropped to the lungs' bounding box" in card and "same size and depth as the image" not in card


def test_merge_while_the_only_shard_runs_says_it_runs(tmp_path, capsys):
    from lungmask_kit.runfolder import RunLock, Shard

    out = tmp_path / "out"
    out.mkdir()
    with RunLock(out, Shard(1, 2)):
        assert main(["merge", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "still running" in err and "shard 1/2" in err


@pytest.mark.parametrize("command", ["report", "publish"])
def test_a_rerun_says_which_added_files_went_with_the_old_folder(tmp_path, run, capsys, command):
    dest = tmp_path / "dest"
    assert main([command, str(run), "-o", str(dest), "-q"]) == 0
    (dest / "my-notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([command, str(run), "-o", str(dest), "-q"]) == 0
    err = capsys.readouterr().err
    assert "1 file(s) added" in err and "my-notes.txt" in err
    assert main([command, str(run), "-o", str(dest), "-q"]) == 0
    assert "added" not in capsys.readouterr().err  # lungkit's own files are never reported
    if command == "publish":
        assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=dest).returncode == 0


def test_shard_mb_below_a_row_group_still_cuts_shards(tmp_path, example_images, example_masks):
    out = tmp_path / "var"
    assert main(["variants", "--images", str(example_images), "--masks", str(example_masks), "-o", str(out), "-j", "1",
                 "-q"]) == 0
    ds = tmp_path / "ds"
    assert main(["publish", str(out), "-o", str(ds), "--include-flagged", "--shard-mb", "4", "-q"]) == 0
    shards = sorted((ds / "data").glob("*.parquet"))
    total = sum(p.stat().st_size for p in shards)
    assert total > 8 << 20 and len(shards) >= total // (8 << 20)  # about 4 MB each, not one file of everything
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in shards) == 8


def test_the_card_says_only_what_is_true(tmp_path, run, capsys):
    ds = tmp_path / "ds"
    assert main(["publish", str(run), "-o", str(ds), "--include-flagged", "--masks-only"]) == 0
    assert "licence is unknown" in capsys.readouterr().err  # no license column, no --license
    card = (ds / "README.md").read_text()
    assert 'license: "unknown"' in card and "ask the source's owners" in card and "see the licence table" not in card
    assert "year = {" in card and "author = {" in card
    croissant = json.loads((ds / "croissant.json").read_text())
    assert "flag rates" not in json.dumps(croissant) and "year = {" in croissant["citeAs"]
    table = pq.read_table(next((ds / "data").glob("*.parquet")))
    assert not {"mask_path", "lungs_path", "nolungs_path"} & set(table.column_names)  # files the dataset lacks


def test_publish_leaves_no_identifier_in_paths_or_png_text(tmp_path, example_images, capsys):
    """A PACS-like export (PatientID/SOPInstanceUID.png, PNGs with a PatientName text chunk): full mode publishes
    neither, and the card says exactly what it did; masks-only keeps paths (its users match images by them) and
    says so."""
    import zlib

    def with_text(png: bytes, key: bytes, text: bytes) -> bytes:
        body = key + b"\0" + text
        chunk = len(body).to_bytes(4, "big") + b"tEXt" + body
        chunk += zlib.crc32(b"tEXt" + body).to_bytes(4, "big")
        return png[:33] + chunk + png[33:]  # after IHDR (8 + 25 bytes)

    src = tmp_path / "export"
    uids = ["1.2.840.113619.2.55.3.1", "1.2.840.113619.2.55.3.2"]
    for uid, name in zip(uids, sorted(p.name for p in example_images.glob("*.png"))[:2]):
        (src / "PAT4711").mkdir(parents=True, exist_ok=True)
        png = with_text((example_images / name).read_bytes(), b"PatientName", b"Doe^Jane")
        (src / "PAT4711" / f"{uid}.png").write_bytes(png)
    labels = tmp_path / "labels.csv"
    labels.write_text("path,patient_id\n" + "".join(f"PAT4711/{u}.png,PAT4711\n" for u in uids))
    run = tmp_path / "seg"
    assert main(["segment", str(src), "-o", str(run), "--labels", str(labels), "-q"]) == 0
    ds = tmp_path / "ds"
    assert main(["publish", str(run), "-o", str(ds), "--include-flagged", "-q"]) == 0
    blob = b"".join(p.read_bytes() for p in ds.rglob("*") if p.is_file())
    assert b"Doe^Jane" not in blob and b"PAT4711" not in blob and uids[0].encode() not in blob
    rows = pq.read_table(next((ds / "data").glob("*.parquet"))).to_pylist()
    assert all(r["path"].startswith("anon-") and r["path"].count("/") == 1 for r in rows)
    card = (ds / "README.md").read_text()
    assert "replaced by pseudonyms the same way (2 path(s))" in card and "without their text chunks" in card
    masks = tmp_path / "masks"
    assert main(["publish", str(run), "-o", str(masks), "--include-flagged", "--masks-only", "-q"]) == 0
    assert "`path` is published as in the source" in (masks / "README.md").read_text()
    kept = tmp_path / "kept"
    assert main(["publish", str(run), "-o", str(kept), "--include-flagged", "--keep-identifiers", "-q"]) == 0
    assert b"Doe^Jane" in b"".join(p.read_bytes() for p in (kept / "data").glob("*.parquet"))

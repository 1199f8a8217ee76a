"""--precision: bf16 where the CPU computes it, fp32 elsewhere; a resume setting; masks that agree with fp32."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from lungmask_kit.imaging import read_gray
from lungmask_kit.metrics import dice
from lungmask_kit.runtime import autocast_dtype, cpu_has_bf16
from lungmask_kit.runtimes import openvino_installed
from lungmask_kit.segment import SegmentOptions, run_segment

needs_bf16 = pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 units")


def _run(src, out, **options):
    return run_segment(src, out, SegmentOptions(progress=False, **options))


def test_auto_is_fp32_on_a_cpu_without_bf16_units(monkeypatch):
    import lungmask_kit.runtime as runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    with pytest.raises(runtime.LungkitError, match="no bf16 units"):
        autocast_dtype("bf16", cpu)
    assert autocast_dtype("auto", cuda) == torch.float16  # a GPU's tensor cores, as before
    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: True)
    assert autocast_dtype("auto", cpu) == torch.bfloat16 and autocast_dtype("fp32", cpu) is None


def test_bf16_refused_in_one_line_where_the_cpu_cannot(monkeypatch, tmp_path, small_corpus, capsys):
    import lungmask_kit.runtime as runtime
    from lungmask_kit.cli.app import main

    monkeypatch.setattr(runtime, "cpu_has_bf16", lambda: False)
    assert main(["segment", str(small_corpus), "-o", str(tmp_path / "out"), "--precision", "bf16", "--device", "cpu"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "no bf16 units" in errors[0]
    s = _run(small_corpus, tmp_path / "auto", device="cpu")  # auto falls back to fp32, on OpenVINO where installed
    meta = json.loads(pq.read_schema(tmp_path / "auto" / "manifest.parquet").metadata[b"lungkit"])
    assert s.ok == 3 and meta["precision"] == "fp32"
    assert meta["backend"] == ("openvino" if openvino_installed() else "torch")


@needs_bf16
def test_precision_is_a_resume_setting(tmp_path, small_corpus):
    out = tmp_path / "out"
    assert _run(small_corpus, out, precision="fp32").processed == 3
    again = _run(small_corpus, out, precision="bf16")
    assert again.processed == 3 and again.skipped == 0
    assert _run(small_corpus, out, precision="auto").skipped == 3  # auto is bf16 on this CPU
    meta = json.loads(pq.read_schema(out / "manifest.parquet").metadata[b"lungkit"])
    assert meta["precision"] == "bf16"


@needs_bf16
def test_bf16_masks_agree_with_fp32_on_the_bundled_examples(tmp_path, example_images):
    _run(example_images, tmp_path / "fp32", precision="fp32")
    _run(example_images, tmp_path / "bf16", precision="bf16")
    a = {r["path"]: r for r in pq.read_table(tmp_path / "fp32" / "manifest.parquet").to_pylist()}
    b = {r["path"]: r for r in pq.read_table(tmp_path / "bf16" / "manifest.parquet").to_pylist()}
    assert a.keys() == b.keys() and len(a) == 8
    for path in a:
        m1 = read_gray(tmp_path / "fp32" / a[path]["mask_path"]) > 0
        m2 = read_gray(tmp_path / "bf16" / b[path]["mask_path"]) > 0
        assert dice(m1, m2) >= 0.99, path
        assert abs(a[path]["est_dice"] - b[path]["est_dice"]) < 0.005, path
        assert abs(a[path]["ood_score"] - b[path]["ood_score"]) < 0.05, path
        assert a[path]["qc_pass"] == b[path]["qc_pass"], path
    assert np.mean([dice(read_gray(tmp_path / "fp32" / a[p]["mask_path"]) > 0,
                         read_gray(tmp_path / "bf16" / b[p]["mask_path"]) > 0) for p in a]) >= 0.998


def test_segment_lets_openmp_threads_sleep_unless_the_user_chose(tmp_path):
    """OMP_WAIT_POLICY=PASSIVE for segment (its decode and writer threads share the cores with the model), set
    before torch loads; a policy the user set stands, and once torch is loaded nothing changes."""
    import os
    import subprocess
    import sys

    code = ("import os, sys; from lungmask_kit.runtime import passive_openmp_threads as p; a = p(); "
            "import torch; b = p(); print(a, b, os.environ.get('OMP_WAIT_POLICY'))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "PASSIVE"]
    out = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True).stdout
    assert out.split() == ["False", "False", "ACTIVE"]

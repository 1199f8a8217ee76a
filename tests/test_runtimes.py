"""--runtime: the OpenVINO runtime draws torch fp32's masks, `auto` picks it only on a CPU without bf16 units, its
converted model is cached by the weights' hash, and importing it through lungkit sends no telemetry."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from lungmask_kit.errors import LungkitError
from lungmask_kit.imaging import read_gray
from lungmask_kit.runtimes import choose_runtime, openvino_installed
from lungmask_kit.segment import SegmentOptions, run_segment

# not pytest.importorskip: a plain `import openvino` sends OpenVINO's usage event
pytestmark = pytest.mark.skipif(not openvino_installed(), reason="OpenVINO is not installed")


def _run(src, out, **options):
    return run_segment(src, out, SegmentOptions(progress=False, device="cpu", **options))


def _metadata(out):
    return json.loads(pq.read_schema(out / "manifest.parquet").metadata[b"lungkit"])


def test_openvino_draws_the_masks_torch_fp32_draws(tmp_path, example_images):
    """All eight bundled examples through both runtimes: the same mask pixels and every manifest column the same
    but the settings key (which names the runtime, so a resume never mixes them)."""
    torch_out, ov_out = tmp_path / "torch", tmp_path / "openvino"
    assert _run(example_images, torch_out, runtime="torch", precision="fp32").ok == 8
    assert _run(example_images, ov_out, runtime="openvino").ok == 8
    a = pq.read_table(torch_out / "manifest.parquet").to_pylist()
    b = pq.read_table(ov_out / "manifest.parquet").to_pylist()
    assert [r["path"] for r in a] == [r["path"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["settings_key"] != rb["settings_key"]
        differing = [k for k in ra if k != "settings_key" and ra[k] != rb[k]]
        assert not differing, (ra["path"], differing)
        assert np.array_equal(read_gray(torch_out / ra["mask_path"]), read_gray(ov_out / rb["mask_path"]))
    assert (_metadata(torch_out)["backend"], _metadata(ov_out)["backend"]) == ("torch", "openvino")
    assert _metadata(ov_out)["precision"] == "fp32"


def test_the_runtime_is_a_resume_setting(tmp_path, small_corpus):
    out = tmp_path / "out"
    assert _run(small_corpus, out, runtime="torch", precision="fp32").processed == 3
    switched = _run(small_corpus, out, runtime="openvino")
    assert switched.processed == 3 and switched.skipped == 0
    assert switched.model.endswith("CPU: openvino fp32")  # the summary says what drew the masks
    assert _run(small_corpus, out, runtime="openvino").skipped == 3


def test_auto_picks_openvino_only_on_a_cpu_without_bf16_units(monkeypatch):
    import lungmask_kit.runtime as host

    monkeypatch.setattr(host, "cpu_has_bf16", lambda: False)
    assert choose_runtime("auto", "cpu", "auto") == "openvino"
    assert choose_runtime("auto", "cpu", "fp32") == "openvino"
    assert choose_runtime("auto", "cuda", "auto") == "torch"
    monkeypatch.setattr(host, "cpu_has_bf16", lambda: True)
    assert choose_runtime("auto", "cpu", "auto") == "torch"  # bf16 torch: faster than any fp32
    assert choose_runtime("auto", "cpu", "bf16") == "torch"
    assert choose_runtime("torch", "cpu", "fp32") == "torch"


def test_runtimes_that_cannot_run_are_one_line_and_exit_2(tmp_path, small_corpus, capsys, monkeypatch):
    from lungmask_kit.cli.app import main

    with pytest.raises(LungkitError, match="runs the model on the CPU"):
        choose_runtime("openvino", "cuda", "auto")
    import lungmask_kit.runtimes as runtimes

    monkeypatch.setattr(runtimes, "openvino_installed", lambda: False)
    assert choose_runtime("auto", "cpu", "fp32") == "torch"  # auto without OpenVINO: torch, silently
    assert main(["segment", str(small_corpus), "-o", str(tmp_path / "out"), "--runtime", "openvino", "-q"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == ["lungkit: error: --runtime openvino needs OpenVINO: pip install openvino"]
    assert not (tmp_path / "out" / "manifest.parquet").exists()


def test_the_converted_model_is_cached_by_the_weights_hash_and_a_damaged_entry_is_redone(tmp_path, monkeypatch,
                                                                                           random_weights):
    import torch

    import lungmask_kit.runtimes.openvino as ov_runtime
    from lungmask_kit.inference import Segmenter

    monkeypatch.setenv("LUNGKIT_CACHE_DIR", str(tmp_path / "cache"))
    conversions = []
    convert = ov_runtime.convert
    monkeypatch.setattr(ov_runtime, "convert", lambda *a: conversions.append(1) or convert(*a))
    x = np.random.default_rng(0).standard_normal((3, 1, 256, 256)).astype(np.float32)
    first = Segmenter(random_weights, torch.device("cpu"), runtime="openvino").predict(x, pad_to=4)
    entries = list((tmp_path / "cache" / "openvino").iterdir())
    assert len(conversions) == 1 and len(entries) == 1 and (entries[0] / "model.xml").is_file()
    assert entries[0].name.startswith(Segmenter(random_weights, torch.device("cpu")).weights_sha256[:32])
    again = Segmenter(random_weights, torch.device("cpu"), runtime="openvino").predict(x, pad_to=4)
    assert len(conversions) == 1 and np.array_equal(first, again)
    (entries[0] / "model.xml").write_text("<net")  # a cut-off write by some other tool
    redone = Segmenter(random_weights, torch.device("cpu"), runtime="openvino").predict(x, pad_to=4)
    assert len(conversions) == 2 and np.array_equal(first, redone)
    reference = Segmenter(random_weights, torch.device("cpu"), precision="fp32").predict(x, pad_to=4)
    assert np.abs(first - reference).max() < 1e-4
    assert not [p for p in (tmp_path / "cache" / "openvino").iterdir() if p.name.startswith(".tmp")]


def test_importing_openvino_through_lungkit_sends_no_telemetry(tmp_path):
    """OpenVINO records a client id under ~/intel and sends a usage event on import unless declined (outside CI);
    through `import_openvino` its telemetry is its own no-op stub and nothing is written. (No control imports it
    plainly: that would send an event from the test machine; the telemetry package being installed shows the stub
    was lungkit's doing.)"""
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}  # OpenVINO skips CI
    code = ("import importlib.util; print(importlib.util.find_spec('openvino_telemetry') is not None); "
            "from lungmask_kit.runtimes.openvino import import_openvino; import_openvino(); "
            "import openvino.tools.ovc.telemetry_utils as t; print(t.tm.__name__)")
    done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path)}, check=True, timeout=120,
                          capture_output=True, text=True)
    assert done.stdout.split() == ["True", "openvino.tools.ovc.telemetry_stub"]
    assert list(tmp_path.rglob("*")) == []

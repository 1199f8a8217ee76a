"""The Ray Data engine on a local Ray instance: the same rows and bytes as the local engine, the same resume.
Skipped where ray is not installed (pip install 'lungkit[ray]')."""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
import pytest
from conftest import cxr_like, write_png

from lungmask_kit.errors import LungkitError
from lungmask_kit.segment import SegmentOptions, run_segment


def test_without_ray_the_engine_is_one_clear_error(tmp_path, random_weights, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    write_png(tmp_path / "in" / "a.png", cxr_like(300, 280))
    with pytest.raises(LungkitError, match=r"pip install 'lungkit\[ray\]'"):
        run_segment(tmp_path / "in", tmp_path / "out", SegmentOptions(weights=random_weights, engine="ray", progress=False))


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.data")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_ray_engine_writes_what_the_local_engine_writes(tmp_path, random_weights, local_ray):
    src = tmp_path / "in"
    for i in range(11):
        write_png(src / f"d{i % 3}" / f"img{i:02d}.png", cxr_like(300 + 13 * i, 280, seed=i))
    write_png(src / "deep16.png", cxr_like(320, 300, seed=20).astype("uint16") * 150)
    (src / "broken.png").write_bytes(b"not a png")
    opts = dict(weights=random_weights, batch_size=4, progress=False)
    local = run_segment(src, tmp_path / "local", SegmentOptions(**opts))
    ray_run = run_segment(src, tmp_path / "ray", SegmentOptions(engine="ray", **opts))
    assert (ray_run.ok, ray_run.failed) == (local.ok, local.failed) == (12, 1)
    a = pq.read_table(tmp_path / "local" / "manifest.parquet")
    b = pq.read_table(tmp_path / "ray" / "manifest.parquet")
    assert a.replace_schema_metadata(None).equals(b.replace_schema_metadata(None))
    assert b'"engine": "ray"' in b.schema.metadata[b"lungkit"]
    for kind in ("masks", "lungs", "nolungs"):
        files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local" / kind).rglob("*.png"))
        assert len(files) == 12
        for f in files:
            assert (tmp_path / "local" / f).read_bytes() == (tmp_path / "ray" / f).read_bytes(), f
    # resume: a second run skips every finished image and redoes only the failed one
    again = run_segment(src, tmp_path / "ray", SegmentOptions(engine="ray", **opts))
    assert again.skipped == 12 and again.processed == 1
    # the two engines' runs share settings keys, so one resumes the other
    mixed = run_segment(src, tmp_path / "local", SegmentOptions(engine="ray", **opts))
    assert mixed.skipped == 12

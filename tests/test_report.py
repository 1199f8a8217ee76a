"""`lungkit report`: the QC page of a run. Every flagged image is on a page, every image on a page exists (checked
in headless Chromium where it is installed), failures are listed, 16-bit and moved inputs still render."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from lungmask_kit.cli.app import main

from conftest import cxr_like, write_png


class _Page(HTMLParser):
    """The image sources, link targets and text of one HTML page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory, example_images) -> Path:
    """A segment run with the bundled model over real CXRs, a 16-bit one, non-CXR pictures it flags, and broken
    files that fail."""
    root = tmp_path_factory.mktemp("report")
    src = root / "in"
    src.mkdir()
    for name in ("ieee_thnov10p5641g006-c.png", "ieee_41182_2020_203_Fig3_HTML.png", "ieee_b39f5cf9.png"):
        shutil.copy(example_images / name, src / name)
    real = cv2.imread(str(example_images / "ieee_b39f5cf9.png"), cv2.IMREAD_GRAYSCALE)
    write_png(src / "deep" / "sixteen.png", real.astype(np.uint16) * 257)
    for i in range(3):  # not chest X-rays: noise and a synthetic phantom, flagged by the input gate
        write_png(src / "odd" / f"noise{i}.png", np.random.default_rng(i).integers(0, 255, (300, 300), dtype=np.uint8))
    write_png(src / "odd" / "phantom <b>&.png", cxr_like(seed=1))
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
    (src / "empty.jpg").write_bytes(b"")
    assert main(["segment", str(src), "-o", str(root / "out"), "-q"]) == 1  # two failed
    return root / "out"


def test_report_shows_every_flagged_image_and_every_failure(mixed_run, tmp_path):
    report = tmp_path / "rep"
    assert main(["report", str(mixed_run), "-o", str(report), "--per-page", "2", "-q"]) == 0
    m = pd.read_parquet(mixed_run / "manifest.parquet")
    flagged = set(m.path[m.qc_pass == False])  # noqa: E712
    assert len(flagged) >= 4
    pages = {p.name: parse(p) for p in report.glob("*.html")}
    on_flagged_pages = set()
    for name, page in pages.items():
        if name.startswith("flagged-"):
            on_flagged_pages |= {t for t in page.text if t in flagged}
        for src in page.images:  # every picture a page names exists, inside the report
            assert (report / src).is_file() and (report / src).resolve().is_relative_to(report.resolve()), src
        for href in page.links:
            assert (report / href).is_file(), href
    assert on_flagged_pages == flagged
    assert any(p.startswith("flagged-") and re.search(r"-\d+\.html$", p) for p in pages)  # paged at 2 per page
    failed = " ".join(pages["failed.html"].text)
    assert "broken.png" in failed and "empty.jpg" in failed and "empty file (0 bytes)" in failed
    # the special characters of a file name are escaped, not markup
    assert "phantom &lt;b&gt;&amp;.png" in (report / "sample.html").read_text() + "".join(
        p.read_text() for p in report.glob("flagged-*.html"))


def test_report_is_portable_and_follows_the_umask(mixed_run, tmp_path):
    report = tmp_path / "rep"
    assert main(["report", str(mixed_run), "-o", str(report), "-q"]) == 0
    for path in report.rglob("*"):
        mode = path.stat().st_mode & 0o777
        assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))
        if path.suffix == ".html":
            text = path.read_text()
            assert str(mixed_run.parent) not in text and "/tmp/" not in text and "http" not in text.replace("http-equiv", "")


def test_sixteen_bit_image_renders_with_contrast(mixed_run, tmp_path):
    from lungmask_kit.report.render import image_name

    report = tmp_path / "rep"
    assert main(["report", str(mixed_run), "-o", str(report), "--sample", "100", "-q"]) == 0
    thumb = cv2.imread(str(report / "img" / f"{image_name('deep/sixteen.png')}.jpg"), cv2.IMREAD_GRAYSCALE)
    assert thumb is not None and thumb.std() > 20  # stretched to the visible range, not a flat grey tile


def test_report_of_a_clean_run_says_nothing_was_flagged(tmp_path, example_images):
    out = tmp_path / "out"
    assert main(["segment", str(example_images), "-o", str(out), "-q", "--report"]) == 0
    index = (out / "report" / "index.html").read_text()
    assert "No image was flagged by QC." in index
    assert not list((out / "report").glob("flagged-*.html")) and not (out / "report" / "failed.html").exists()
    assert len(parse(out / "report" / "sample.html").images) == 8


def test_rerun_replaces_the_report_and_refuses_a_foreign_folder(mixed_run, tmp_path):
    report = tmp_path / "rep"
    assert main(["report", str(mixed_run), "-o", str(report), "--sample", "100", "-q"]) == 0
    before = set(p.name for p in (report / "img").iterdir())
    assert main(["report", str(mixed_run), "-o", str(report), "--sample", "0", "--lowest", "0", "-q"]) == 0
    after = set(p.name for p in (report / "img").iterdir())
    named = set()
    for page in report.glob("*.html"):
        parsed = parse(page)
        named |= {Path(p).name for p in parsed.images + parsed.links if p.startswith("img/")}
    assert after == named and after < before  # only the flagged images' overlays: nothing stale stays
    assert not list(tmp_path.glob(".rep.lungkit-*"))  # no staging folder left behind
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(["report", str(mixed_run), "-o", str(foreign), "-q"]) == 2
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r2"), "-q"]) == 2  # not a run folder


def test_report_of_a_variants_run_whose_inputs_moved(tmp_path, example_images, example_masks):
    images = tmp_path / "images"
    shutil.copytree(example_images, images)
    out = tmp_path / "var"
    assert main(["variants", "--images", str(images), "--masks", str(example_masks), "-o", str(out), "-q"]) == 0
    shutil.rmtree(images)  # the originals are gone: lungs + nolungs put each image back together
    result = subprocess.run([sys.executable, "-m", "lungmask_kit.cli.app", "report", str(out)], capture_output=True, text=True)
    assert result.returncode == 0 and "placeholder" not in result.stderr, result.stderr
    lowest = (out / "report" / "lowest.html").read_text()
    assert "worst ood_shape_score" in lowest and "image not found" not in lowest


def _chromium() -> str | None:
    return next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


_CHECK = """<script>
addEventListener('load', () => {
  const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src'));
  document.body.setAttribute('data-images', document.images.length);
  document.body.setAttribute('data-broken', JSON.stringify(broken));
});
</script></body>"""


def loaded_in_browser(browser: str, page: Path, tmp_path: Path) -> tuple[int, list[str]]:
    """(images on the page, images that did not load) as headless Chromium sees them: a copy of the page with a
    checking script is opened from the same folder."""
    probe = page.with_name(f"_probe-{page.name}")
    probe.write_text(page.read_text().replace("</body>", _CHECK))
    try:
        dom = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120).stdout
    finally:
        probe.unlink()
    found = re.search(r'data-images="(\d+)" data-broken="([^"]*)"', dom)
    assert found, dom[-500:]
    return int(found.group(1)), json.loads(found.group(2).replace("&quot;", '"'))


def test_every_image_loads_in_headless_chromium(mixed_run, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("LUNGKIT_REQUIRE_BROWSER"):  # set by .ci/run, which installs Chromium
            pytest.fail("no Chromium found, and LUNGKIT_REQUIRE_BROWSER is set")
        pytest.skip("no Chromium installed (apt-get install chromium)")
    report = tmp_path / "rep"
    assert main(["report", str(mixed_run), "-o", str(report), "-q"]) == 0
    for page in sorted(report.glob("*.html")):
        n, broken = loaded_in_browser(browser, page, tmp_path)
        assert broken == [], (page.name, broken)
        assert n == len(parse(page).images)
    shot = tmp_path / "index.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900", f"--screenshot={shot}",
                    (report / "index.html").as_uri()], capture_output=True, timeout=120)
    pixels = cv2.imread(str(shot), cv2.IMREAD_GRAYSCALE)
    assert pixels is not None and pixels.std() > 10  # a rendered page, not a blank one

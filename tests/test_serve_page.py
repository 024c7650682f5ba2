"""The page of `deeplab serve` in headless Chromium (Debian's chromium, driven by Playwright): the
packaged model on a live server, a CamVid frame uploaded, the overlay and the legend read back,
the opacity slider, the label PNG downloaded (equal to `deeplab segment`'s), the CRF switch,
an error shown in the page, and no request leaving the server's origin.

Skipped only outside CI when Chromium or Playwright is missing; in CI (.ci/run installs both) it
must run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _evaluation_helpers import free_port, run_cli
from _serve_helpers import LiveServer, skip_without

skip_without("starlette")
skip_without("uvicorn")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless without a sandbox (CI runs as root), a GPU or any network of Chromium's own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-default-apps", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage"]


def _browser_or_skip():
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("the playwright package (pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        missing.append("Chromium at /usr/bin/chromium (apt-get install chromium)")
    if missing:
        msg = f"the page test needs {' and '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(msg + ": .ci/run installs them")
        pytest.skip(msg)
    return sync_playwright


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("page")
    live = LiveServer([], free_port(), root / "server.log")
    live.wait_ready()
    yield live
    live.stop()


def test_the_page_segments_a_camvid_frame(server, camvid_root, tmp_path):
    sync_playwright = _browser_or_skip()
    from deeplab.weights import default_weights_path, read_metadata

    frame = camvid_root / "val" / "0016E5_07959.png"
    assert run_cli(["segment", str(frame), "--out", str(tmp_path / "seg")]) == 0
    expected_png = (tmp_path / "seg" / "0016E5_07959.png").read_bytes()
    labels = np.asarray(Image.open(tmp_path / "seg" / "0016E5_07959.png"))
    meta = read_metadata(default_weights_path())
    names, palette = meta["class_names"], np.asarray(meta["palette"])
    counts = np.bincount(labels.ravel(), minlength=len(names))
    rgb = np.asarray(Image.open(frame).convert("RGB"))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 820}, accept_downloads=True)
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('deeplab_v2_resnet18')",
                                   timeout=30_000)

            page.set_input_files("#file", str(frame))
            page.wait_for_selector("body[data-done='1']", timeout=60_000)
            assert page.is_visible("#overlay") and page.is_visible("#original")
            assert page.eval_on_selector("#overlay", "c => [c.width, c.height]") == [480, 360]
            assert not page.is_visible("#error")

            # The legend: the classes of segment's labels, by share, with their shares.
            rows = page.eval_on_selector_all("#legend li", "els => els.map(e => [e.dataset.name, +e.dataset.share])")
            assert [n for n, _ in rows] == [names[i] for i in np.argsort(-counts, kind="stable") if counts[i]]
            for name, share in rows:
                assert share == pytest.approx(counts[names.index(name)] / labels.size, abs=1e-6)
            assert page.inner_text("#legend li:first-child .share") == f"{100 * rows[0][1]:.1f} %"

            # The opacity slider blends the image and the colours: 0 shows the image, 100 the colours.
            def pixel(x: int, y: int) -> list[int]:
                return page.evaluate(f"Array.from(document.getElementById('overlay').getContext('2d')"
                                     f".getImageData({x}, {y}, 1, 1).data).slice(0, 3)")

            for value, want in (("0", lambda y, x: rgb[y, x]), ("100", lambda y, x: palette[labels[y, x]])):
                page.fill("#opacity", value)
                for y, x in ((50, 60), (300, 400)):
                    assert np.abs(np.array(pixel(x, y)) - want(y, x)).max() <= 2, (value, x, y)

            # The download is the label PNG of deeplab segment, byte for byte.
            with page.expect_download() as info:
                page.click("#download")
            assert info.value.suggested_filename == "0016E5_07959.png"
            assert Path(info.value.path()).read_bytes() == expected_png

            # The CRF switch segments again with the CRF.
            page.check("#crf")
            page.wait_for_selector("body[data-done='2']", timeout=90_000)
            assert "CRF" in page.inner_text("#status")

            # An error is shown in the page, from the service's JSON.
            page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                                  "buffer": b"not a picture"}])
            page.wait_for_selector("#error.shown", timeout=30_000)
            assert "not an image" in page.inner_text("#error")

            # Nothing was fetched from anywhere but the service (and the page's own blobs).
            outside = [u for u in requested if not u.startswith((server.url + "/", "blob:", "data:"))]
            assert outside == []
        finally:
            browser.close()

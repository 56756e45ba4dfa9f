"""The upload page in a real headless browser (Debian's chromium driven by Playwright): pick an
image, drag a box, inspect; the region is drawn and listed with its verdict and probability.
Skips when the browser or Playwright is missing; CI installs both. The screenshot is saved
with the test's files; UPDATE_SCREENSHOTS=1 also refreshes docs/serve_page.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.serve.conftest import image_bytes

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = REPO / "docs" / "serve_page.png"


@pytest.mark.slow
def test_pick_an_image_drag_a_box_and_see_its_verdict(serve, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("no chromium (apt-get install chromium)")
    picture = tmp_path / "part.png"
    picture.write_bytes(image_bytes((320, 200), seed=7))
    with serve() as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 900, "height": 800})
        page.goto(url + "/")
        page.set_input_files("#file", str(picture))
        page.wait_for_function("document.getElementById('canvas').width === 320")
        box = page.locator("#canvas").bounding_box()
        scale = box["width"] / 320  # the canvas may be drawn smaller than the image
        page.mouse.move(box["x"] + 20 * scale, box["y"] + 30 * scale)
        page.mouse.down()
        page.mouse.move(box["x"] + 120 * scale, box["y"] + 110 * scale, steps=5)
        page.mouse.up()
        page.click("#inspect")
        page.wait_for_selector("#regions:not([hidden]) tbody tr")
        cells = page.locator("#regions tbody tr").first.locator("td").all_inner_texts()
        status = page.inner_text("#status")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        browser.close()
    if os.environ.get("UPDATE_SCREENSHOTS"):  # refresh the one docs/serving.md shows
        shutil.copyfile(tmp_path / "page.png", SCREENSHOT)
    region, xyxy, verdict, _cls, probability = cells
    assert region == "1"
    x1, y1, x2, y2 = (float(v) for v in xyxy.split(","))
    assert abs(x1 - 20) <= 2 and abs(y1 - 30) <= 2 and abs(x2 - 120) <= 2 and abs(y2 - 110) <= 2
    assert verdict in ("normal", "abnormal") and 0 <= float(probability) <= 1
    assert "model base (not registered)" in status

"""The web page in a real browser: Debian's chromium, driven headless by Playwright."""

import os
import shutil
from pathlib import Path

import pytest

from service.app import create_app
from service.bundle import Bundle
from service.settings import Settings
from tests.conftest import serving

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
EXAMPLES = Path(__file__).resolve().parent.parent / "service" / "static" / "examples" / "mnist"


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


@pytest.mark.slow
def test_upload_and_gallery_in_a_real_browser(mnist: Bundle) -> None:
    from playwright.sync_api import expect, sync_playwright

    chromium = _chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    with serving(create_app(Settings(device="cpu"), bundle=mnist)) as base, sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.goto(base + "/")
        expect(page.locator("#model")).to_contain_text("mnist v1.0.0 on cpu")
        page.set_input_files("#file", str(EXAMPLES / "01-clean.png"))
        expect(page.locator("#sentence")).to_contain_text("Not flagged")
        expect(page.locator("#sentence")).to_contain_text("Predicted 3")
        page.locator("#gallery button").nth(3).click()  # the PGD version of that digit
        expect(page.locator("#sentence")).to_contain_text("Flagged:")
        drawn = page.evaluate(
            "() => { const c = document.getElementById('canvas'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] || d[i + 1] || d[i + 2]) n++; return n; }"
        )
        assert drawn > 1000
        page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
        expect(page.locator("#error")).to_contain_text("unsupported_media_type")
        page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
        browser.close()

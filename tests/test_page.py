"""The web page in a real browser: Debian's chromium, driven headless by Playwright."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from service.bundle import Bundle
from service.serve.app import create_app
from service.serve.gallery import GALLERY
from service.serve.settings import Settings
from tests.conftest import need_tool, serving

if TYPE_CHECKING:
    from playwright.sync_api import Browser

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
EXAMPLES = GALLERY / "mnist"


ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--no-first-run"]
PAINTED = (
    "(id) => { const c = document.getElementById(id); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
    " let n = 0; for (let i = 0; i < d.length; i += 4) if (d[i] || d[i + 1] || d[i + 2]) n++; return n; }"
)
MARKER_RED = (
    "() => { const c = document.getElementById('hist'); const x = Math.round(parseFloat(c.dataset.marker));"
    " const d = c.getContext('2d').getImageData(x, 5, 1, 1).data; return [d[0], d[1], d[2]]; }"
)


@contextmanager
def browser_on(bundle: Bundle | list[Bundle], **settings: object) -> Iterator[tuple["Browser", str]]:
    from playwright.sync_api import sync_playwright

    chromium = need_tool("chromium", "chromium")
    with serving(create_app(Settings(device="cpu", **settings), bundle=bundle)) as base, sync_playwright() as pw:  # type: ignore[arg-type]
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            yield browser, base
        finally:
            browser.close()


@pytest.mark.slow
def test_upload_and_gallery_in_a_real_browser(mnist: Bundle) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    cal = mnist.calibration
    assert cal is not None
    correct = cal.data["correct"]
    with browser_on(mnist) as (browser, base):
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.goto(base + "/")
        expect(page.locator("#model")).to_contain_text("mnist v1.0.0 on cpu")
        expect(page.locator("#model")).to_contain_text(f"calibrated on {correct} clean images")
        expect(page.locator("#model")).to_contain_text(f"calibrated on n = {cal.n} of them held apart")
        expect(page.locator("#picker")).to_be_hidden()  # one model: nothing to pick
        page.set_input_files("#file", str(EXAMPLES / "01-clean.png"))
        expect(page.locator("#sentence")).to_contain_text("Not flagged")
        expect(page.locator("#sentence")).to_contain_text("Predicted 3")
        expect(page.locator("#sentence")).to_contain_text("gives a combined p-value of")
        expect(page.locator("#hist-caption")).to_contain_text(f"squeeze_drop on {correct} clean calibration images")
        page.locator("#gallery button").nth(3).click()  # the PGD version of that digit
        expect(page.locator("#sentence")).to_contain_text(
            "Flagged: the most unusual of its squeeze_drop (one-sided), learned (one-sided) p-values"
        )
        assert page.evaluate(PAINTED, "canvas") > 1000
        assert page.evaluate(PAINTED, "hist") > 300
        r, g, b = page.evaluate(MARKER_RED)
        assert r > 150 and g < 80 and b < 80  # the image's marker on the histogram
        page.get_by_role("button", name="show the calibration distribution of entropy").click()
        expect(page.locator("#hist-caption")).to_contain_text(f"entropy on {correct} clean calibration images")
        page.screenshot(path=str(ARTIFACTS / "page.png"), full_page=True)
        page.set_input_files("#file", {"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"})
        expect(page.locator("#error")).to_contain_text("That is not an image this server can read. (unsupported_media_type:")
        page.set_input_files("#file", {"name": "broken.png", "mimeType": "image/png", "buffer": b"\x89PNG\r\n\x1a\n" + b"0" * 40})
        expect(page.locator("#error")).to_contain_text("could not be decoded")


@pytest.mark.slow
def test_keyboard_only_on_a_narrow_screen(mnist: Bundle) -> None:
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(exist_ok=True)
    with browser_on(mnist) as (browser, base):
        page = browser.new_page(viewport={"width": 360, "height": 740})
        page.goto(base + "/")
        expect(page.locator("#gallery button")).to_have_count(8)
        for _ in range(20):  # tab from the top of the page to the PGD version of the 3, no mouse
            page.keyboard.press("Tab")
            if page.evaluate("() => document.activeElement.getAttribute('aria-label')") == "PGD-L∞ ε=0.3, 40 steps, 8-bit — true label 3":
                break
        else:
            pytest.fail("no gallery example is reachable with Tab")
        page.keyboard.press("Enter")
        expect(page.locator("#sentence")).to_contain_text("Flagged:")
        page.locator("#map").focus()
        before = page.locator("#map").input_value()
        page.keyboard.press("ArrowDown")
        expect(page.locator("#map")).not_to_have_value(before)
        page.locator("#opacity").focus()
        page.keyboard.press("ArrowLeft")
        assert page.locator("#opacity").input_value() == "0.55"
        width = page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], f"page scrolls sideways on a 360 px screen: {width}"
        box = page.locator("#canvas").bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360
        with page.expect_file_chooser() as chooser:
            page.locator("#drop").focus()
            page.keyboard.press("Enter")
        chooser.value.set_files(str(EXAMPLES / "00-clean.png"))
        expect(page.locator("#sentence")).to_contain_text("Not flagged")
        page.screenshot(path=str(ARTIFACTS / "page-narrow.png"), full_page=True)


@pytest.mark.slow
def test_cifar10_gallery_picked_beside_mnist(mnist: Bundle, cifar10: Bundle) -> None:
    """Both bundles in one server; the page's picker switches to CIFAR-10, whose gallery images then get
    the verdicts they had when `fisherguard examples` made them."""
    import json

    from playwright.sync_api import expect

    entries = json.loads((EXAMPLES.parent / "cifar10" / "index.json").read_text())
    clean, pgd = entries[0], entries[1]
    assert clean["kind"] == "clean" and pgd["kind"] == "pgd" and clean["true_label"] == pgd["true_label"]
    label = clean["true_label"]
    with browser_on([mnist, cifar10]) as (browser, base):
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.goto(base + "/")
        expect(page.locator("#model")).to_contain_text("mnist v1.0.0 on cpu")  # the default: the first
        expect(page.locator("#picker")).to_be_visible()
        page.get_by_label("Model").select_option("cifar10")
        expect(page.locator("#model")).to_contain_text(f"cifar10 v{cifar10.card['version']} on cpu")
        expect(page.locator("#gallery button")).to_have_count(len(entries))
        page.get_by_role("button", name=f"clean — true label {label}").click()
        expect(page.locator("#sentence")).to_contain_text(f"Predicted {label}")
        page.get_by_role("button", name=f"PGD-L∞ ε=8/255, 40 steps, 8-bit — true label {label}").click()
        expect(page.locator("#sentence")).not_to_contain_text(f"Predicted {label}")
        expect(page.locator("#sentence")).to_contain_text("Flagged:" if pgd["flagged_when_made"] else "Not flagged")
        assert page.evaluate(PAINTED, "canvas") > 1000


@pytest.mark.slow
def test_the_page_at_disclosure_level_verdict(mnist: Bundle) -> None:
    """A server that gives verdicts only: the page asks for no scores or heatmaps and shows the class
    and the flag, no p-value, no calibration plot, no score table."""
    from playwright.sync_api import expect

    with browser_on(mnist, disclosure="verdict") as (browser, base):
        page = browser.new_page(viewport={"width": 900, "height": 900})
        page.goto(base + "/")
        expect(page.locator("#model")).to_contain_text("verdicts only")
        page.locator("#gallery button").first.click()
        expect(page.locator("#sentence")).to_contain_text("Predicted")
        expect(page.locator("#sentence")).not_to_contain_text("p-value")
        expect(page.locator("#calibration")).to_be_hidden()
        expect(page.locator("#scores")).to_be_hidden()
        expect(page.locator("#error")).to_be_hidden()

"""The report page in headless Chromium: images load, tables show, untrusted captions stay text.

Needs Debian's ``chromium`` at /usr/bin/chromium and Playwright for Python (never ``playwright
install``: the system browser is used). Without them the test is skipped, unless
``DORI_REQUIRE_BROWSER=1`` (CI), where it fails. ``DORI_SCREENSHOT=path.png`` keeps a screenshot.
"""

import os
import shutil
from pathlib import Path

import pytest

from dori.report import write_report
from tests.report_runs import XSS, make_demo_run

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _unavailable(reason: str):
    if os.environ.get("DORI_REQUIRE_BROWSER") == "1":
        pytest.fail(f"{reason}, and DORI_REQUIRE_BROWSER=1")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_report_page_in_chromium(browser, tmp_path):
    folder = tmp_path / "demo-testbed-20250101T000000Z"
    built = make_demo_run(folder)
    report = write_report([folder])

    page = browser.new_page(viewport={"width": 1100, "height": 900})
    dialogs, requests, errors = [], [], []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.on("request", lambda request: requests.append(request.url))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.goto(report.as_uri(), wait_until="load")

    images = page.eval_on_selector_all("img", "els => els.map(e => [e.complete, e.naturalWidth, e.alt])")
    assert len(images) == built["n_cells"] + built["n_figures"]
    assert all(complete and width > 0 for complete, width, _ in images), images
    assert page.eval_on_selector("img.cell", "e => e.getBoundingClientRect().width") == 96  # 32 px shown at 96

    table = page.locator("table.table1")
    assert table.is_visible()
    assert table.locator("tbody tr").count() == 3
    assert table.locator("tbody tr").first.inner_text().split("\t")[:3] == ["memorized", "40", "0.91 \u00b1 0.05"]

    assert page.locator("script").count() == 0
    assert page.locator(".prompt").first.inner_text() == XSS  # shown as literal text
    assert not dialogs

    manifest = page.locator("details.manifest")
    assert manifest.count() == 1 and not manifest.locator("pre.config").is_visible()  # collapsed
    manifest.locator("summary").click()
    assert '"note": "<b>bold</b>"' in manifest.locator("pre.config").inner_text()
    page.locator("details.subruns summary").click()

    assert all(url.startswith(("file://", "data:")) for url in requests), requests  # nothing from the network
    assert not errors

    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 0
    if os.environ.get("DORI_SCREENSHOT"):
        Path(os.environ["DORI_SCREENSHOT"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, os.environ["DORI_SCREENSHOT"])
    page.close()

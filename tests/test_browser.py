"""The portal in a real browser (Debian's Chromium driven by Playwright), at tablet width.

Screenshots of every page land in test-artifacts/screenshots/.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from tests.conftest import PASSWORD, new_user, run_cli

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = pytest.mark.e2e
CHROMIUM = os.environ.get("GESTALT_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "screenshots"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (apt-get install chromium)")
    sync_playwright = playwright_api.sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def _photos(tmp_path: Path) -> list[Path]:
    paths = []
    for i, img in enumerate((data.astronaut(), np.ascontiguousarray(data.astronaut()[:, ::-1]))):
        path = tmp_path / f"photo{i}.jpg"
        Image.fromarray(img).save(path, quality=90)
        paths.append(path)
    return paths


def _login(page, base: str, email: str) -> None:
    page.goto(base + "/login")
    page.fill("input[name=email]", email)
    page.fill("input[name=password]", PASSWORD)
    page.click("main button[type=submit]")
    page.wait_for_url(base + "/")


def test_clinician_and_admin_in_the_browser(engines, workers, web_server, browser, tmp_path):
    folder = tmp_path / "train"
    for label, flip in (("Syndrome A", False), ("Syndrome B", True)):
        (folder / label).mkdir(parents=True)
        for i, gain in enumerate((0.8, 0.9, 1.0, 1.1)):
            img = np.clip(data.astronaut().astype(np.float32) * gain, 0, 255).astype(np.uint8)
            Image.fromarray(img[:, ::-1] if flip else img).save(folder / label / f"{i}.png")
    trained = run_cli(engines, "train", "--data", str(folder), "--width", "0.125", "--epochs", "1",
                      "--batch-size", "4", "--name", "browser-model", "--activate")
    assert trained.returncode == 0, trained.stderr[-2000:]

    page = browser.new_page(viewport={"width": 1024, "height": 800})
    page.goto(web_server + "/")
    assert "/login" in page.url
    page.screenshot(path=str(SHOTS / "01-login.png"))
    _login(page, web_server, new_user())
    page.screenshot(path=str(SHOTS / "02-cases.png"), full_page=True)

    page.click("text=New case")
    page.fill("input[name=patient_ref]", "PT-BROWSER")
    page.select_option("select[name=sex]", "female")
    page.fill("input[name=age_years]", "5")
    page.screenshot(path=str(SHOTS / "03-new-case.png"))
    page.click("main button[type=submit]")
    page.wait_for_selector("#upload-form")

    page.set_input_files("#photo-input", [str(p) for p in _photos(tmp_path)])
    assert page.locator("img.preview").count() == 2
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#upload-progress li >> text=uploaded")
    page.screenshot(path=str(SHOTS / "04-uploading.png"), full_page=True)
    expect(page.locator("h2 .status-done")).to_have_count(2, timeout=120_000)
    page.screenshot(path=str(SHOTS / "05-results.png"), full_page=True)
    assert page.locator("table.scores").count() == 3  # two photos and the case ranking
    assert page.locator("#case-result >> text=Case ranking (mean of 2 photos)").count() == 1
    assert page.locator("figure.face img").count() == 2
    assert page.locator("figure.face svg.landmarks circle").count() == 2 * 468
    assert page.evaluate("() => document.querySelector('figure.face img').naturalWidth") == 200
    assert page.locator("table.scores >> text=Syndrome A").count() == 3
    assert page.locator("table.scores th >> text=full_face").count() == 2  # per-region columns per photo

    page.select_option("select[name=syndrome]", label="Syndrome A")
    page.select_option("select[name=kind]", "molecular")
    page.fill("input[name=gene]", "NIPBL")
    page.check("input[name=consent]")
    page.click("form.diagnosis button[type=submit]")
    page.wait_for_selector("text=Diagnosis recorded.")
    page.screenshot(path=str(SHOTS / "06-diagnosis.png"), full_page=True)

    with page.expect_popup() as popup:
        page.click("text=Printable report")
    report = popup.value
    report.wait_for_load_state()
    assert "Facial analysis report" in report.content() and "NIPBL" in report.content()
    report.emulate_media(media="print")
    report.pdf(path=str(SHOTS / "07-report.pdf"), format="A4")
    report.screenshot(path=str(SHOTS / "07-report.png"), full_page=True)

    admin = browser.new_page(viewport={"width": 1024, "height": 800})
    _login(admin, web_server, new_user("admin"))
    admin.click("header >> text=Queues")
    admin.wait_for_selector("#depths")
    assert admin.locator("#workers td >> text=yes").count() >= 1
    admin.screenshot(path=str(SHOTS / "08-admin-queues.png"), full_page=True)
    admin.click("header >> text=Models")
    admin.wait_for_selector("#versions")
    assert admin.locator("#versions >> text=browser-model").count() == 1
    admin.screenshot(path=str(SHOTS / "09-admin-models.png"), full_page=True)
    admin.click("header >> text=Audit log")
    assert admin.locator("td >> text=report_export").count() >= 1
    admin.screenshot(path=str(SHOTS / "10-admin-audit.png"), full_page=True)
    # Nothing is wider than a 1024 px tablet.
    for p in (page, admin):
        assert p.evaluate("() => document.documentElement.scrollWidth") <= 1024

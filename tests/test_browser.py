"""The portal in a real browser (Debian's Chromium driven by Playwright), at tablet width.

Screenshots of every page land in test-artifacts/screenshots/.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from skimage import data

from shared.ml.members.casia import casia_only
from tests.conftest import PASSWORD, activate, new_user

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


def _assert_prints_on_at_most(pdf: Path, pages: int) -> None:
    """Render the PDF with pdftoppm (poppler, as a clinic's printer would get it) and count its pages."""
    import subprocess

    if shutil.which("pdftoppm") is None:
        pytest.skip("pdftoppm (Debian's poppler-utils) is not installed")
    out = pdf.with_suffix("")
    for old in pdf.parent.glob(out.name + "-*.png"):
        old.unlink()
    subprocess.run(["pdftoppm", "-png", "-r", "50", str(pdf), str(out)], check=True, timeout=60)
    rendered = sorted(pdf.parent.glob(out.name + "-*.png"))
    assert 1 <= len(rendered) <= pages, f"the report prints on {len(rendered)} pages"


def _photos(tmp_path: Path) -> list[Path]:
    paths = []
    brighter = np.clip(data.astronaut().astype(np.float32) * 1.15, 0, 255).astype(np.uint8)
    for i, img in enumerate((data.astronaut(), np.ascontiguousarray(data.astronaut()[:, ::-1]), brighter)):
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


def test_clinician_and_admin_in_the_browser(engines, workers, web_server, browser, small_model, tmp_path):
    activate(small_model)  # trained on "Syndrome A" and "Syndrome B" (catalogue names)

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
    assert page.locator("img.preview").count() == 3
    page.click("#upload-form button[type=submit]")
    page.wait_for_selector("#upload-progress li >> text=uploaded")
    page.screenshot(path=str(SHOTS / "04-uploading.png"), full_page=True)
    expect(page.locator("h2 .status-done")).to_have_count(3, timeout=180_000)
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    page.set_input_files("#photo-input", [str(notes)])
    page.click("#upload-form button[type=submit]")
    refused = page.locator("#upload-progress li.refused")
    expect(refused).to_have_count(1)
    assert refused.locator("progress").count() == 0 and refused.inner_text().count("notes.txt") == 1
    assert "refused: " in refused.inner_text()
    # What a clinician sees first: one case ranking, then the photos side by side; details fold away.
    page.set_viewport_size({"width": 1280, "height": 900})
    page.reload()
    expect(page.locator("#case-ranking table.ranking")).to_have_count(1)
    page.screenshot(path=str(SHOTS / "05-results.png"), full_page=True)
    height = page.evaluate("() => document.documentElement.scrollHeight")
    assert height < 2500, f"the results page of 3 photos is {height} px tall at 1280 px"
    assert page.locator("#case-ranking >> text=Mean of 3 photos").count() == 1
    assert page.locator("#case-ranking td.similarity .band").count() == 2  # two classes, each with its band
    assert page.locator("#case-ranking th.photo").count() == 3  # per-photo scores in a compact matrix
    assert page.locator("#images table.scores:not(.measurements)").count() == 3  # one folded table per photo
    assert page.locator("#images details.result[open]").count() == 0
    assert page.locator("figure.face img").count() == 3
    assert page.locator("figure.face svg.landmarks circle").count() == 3 * 68  # 68 landmarks per face
    assert page.locator("figure.face svg.landmarks rect.region").count() == 3 * 4  # the paper's four regions
    assert page.evaluate("() => document.querySelector('figure.face img').naturalWidth") == 200
    assert page.evaluate("() => document.querySelector('figure.face img').getBoundingClientRect().width") >= 400
    assert page.locator("th[data-region=full_face] >> text=Whole face").count() == 3  # human region labels
    assert page.locator("h2 .status-done >> text=Scored").count() == 3
    page.set_viewport_size({"width": 1024, "height": 800})
    page.locator("article.image details.result summary").first.click()

    # Clicking a syndrome in a photo's ranking opens its saliency heatmap over the aligned face.
    page.locator("article.image .result table.scores td:nth-child(2)", has_text="Syndrome B").first.click()
    dialog = page.locator("#heatmap-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#heatmap-title")).to_have_text("Heatmap: Syndrome B")
    # By default every member's map, weighted by its share of the aggregate; each member's own map on request.
    expect(page.locator("#heatmap-status")).to_have_text("All members, weighted · Syndrome B", timeout=60_000)
    options = page.locator("#heatmap-region option").all_inner_texts()
    assert options[0] == "all members, weighted by their share", options
    assert any("identity encoder" in o for o in options), options
    assert all("weight" in o for o in options[1:]), options
    assert page.evaluate("() => document.getElementById('heatmap-img').naturalWidth") == 200
    assert "syndrome=Syndrome+B" in page.locator("#heatmap-img").get_attribute("src")
    page.screenshot(path=str(SHOTS / "05b-heatmap.png"))
    page.select_option("#heatmap-region", "upper_half")
    expect(page.locator("#heatmap-status")).to_contain_text("Upper face · weight", timeout=60_000)
    expect(page.locator("#heatmap-status")).to_contain_text("· Syndrome B")
    assert "region=upper_half" in page.locator("#heatmap-img").get_attribute("src")
    page.screenshot(path=str(SHOTS / "05c-heatmap-region.png"))
    page.click("#heatmap-close")
    expect(dialog).to_be_hidden()

    page.fill("input[name=syndrome]", "Syndrome A")  # a catalogue name (the field also autocompletes)
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
    content = report.content()
    assert "not a probability of disease" in content and "Syndromes ranked by facial similarity" in content
    assert small_model in content and report.locator(".photos img").count() == 3
    assert report.evaluate("() => [...document.querySelectorAll('.photos img')].every(i => i.naturalWidth > 0)")
    report.emulate_media(media="print")
    report.pdf(path=str(SHOTS / "07-report.pdf"), format="A4")
    report.screenshot(path=str(SHOTS / "07-report.png"), full_page=True)
    _assert_prints_on_at_most(SHOTS / "07-report.pdf", 2)

    admin = browser.new_page(viewport={"width": 1024, "height": 800})
    _login(admin, web_server, new_user("admin"))
    admin.click("header >> text=Queues")
    admin.wait_for_selector("#depths")
    assert admin.locator("#workers td >> text=yes").count() >= 1
    admin.screenshot(path=str(SHOTS / "08-admin-queues.png"), full_page=True)
    admin.click("header >> text=Models")
    admin.wait_for_selector("#versions")
    assert admin.locator(f"#versions >> text={small_model}").count() == 1
    admin.screenshot(path=str(SHOTS / "09-admin-models.png"), full_page=True)
    admin.click("header >> text=Audit log")
    assert admin.locator("td >> text=report export").count() >= 1
    assert admin.locator("td >> text=heatmap view").count() >= 2
    admin.screenshot(path=str(SHOTS / "10-admin-audit.png"), full_page=True)
    # Nothing is wider than a 1024 px tablet.
    for p in (page, admin):
        assert p.evaluate("() => document.documentElement.scrollWidth") <= 1024


def test_admin_retries_a_failed_photo_and_activates_a_model(engines, workers, web_server, browser):
    """The admin's two buttons: Retry on a failed photo (queues page), Activate on a model version (models page)."""
    import torch
    from sqlalchemy import update

    from shared import photos
    from shared.db import session_scope
    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.modelops import registry
    from shared.models import Image as ImageRow
    from shared.storage import get_storage
    from tests.conftest import Portal

    clinician = Portal(web_server, new_user())
    case_id = clinician.create_case("PT-RETRY")
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(data.astronaut(), cv2.COLOR_RGB2BGR))
    image_id = clinician.upload(case_id, [("retry.jpg", jpeg.tobytes())]).json()["images"][0]["id"]
    settled = ("done", "awaiting_model", "rejected", "failed")
    assert clinician.wait(case_id, timeout=120, settled=settled)["images"][0]["status"] in ("done", "awaiting_model")
    # What a worker leaves when the infer stage ran out of retries.
    with session_scope() as s:
        s.execute(update(ImageRow).where(ImageRow.id == image_id).values(status="scoring"))
    photos.mark_failed(image_id, "infer: gave up after 5 retries (ConnectionError)")

    admin = browser.new_page(viewport={"width": 1024, "height": 800})
    _login(admin, web_server, new_user("admin"))
    admin.click("header >> text=Queues")
    row = admin.locator("#failed tr", has_text="gave up after 5 retries").filter(has_text=str(case_id))
    expect(row).to_have_count(1)
    admin.screenshot(path=str(SHOTS / "11-admin-failed.png"), full_page=True)
    row.locator("button", has_text="Retry").click()
    expect(admin.locator(".flash", has_text=f"Photo {image_id} queued again.")).to_be_visible()
    expect(admin.locator("#failed tr", has_text="gave up after 5 retries").filter(has_text=str(case_id))) \
        .to_have_count(0)
    admin.screenshot(path=str(SHOTS / "12-admin-retried.png"), full_page=True)
    assert clinician.wait(case_id, timeout=120, settled=settled)["images"][0]["status"] in ("done", "awaiting_model")

    torch.manual_seed(0)
    with session_scope() as s:
        before = registry.active_version(s)
        model = RegionalEnsemble(("full_face", "upper_half", "middle_face", "lower_half"), 2, width=0.125)
        registry.register_model(s, get_storage(), casia_only(model, ["Syndrome A", "Syndrome B"]), {},
                                name="browser-candidate")
    admin.click("header >> text=Models")
    candidate = admin.locator("#versions tbody tr", has_text="browser-candidate")
    expect(candidate.locator("td").nth(1)).to_have_text("candidate")
    asked = []
    admin.once("dialog", lambda d: (asked.append(d.message), d.dismiss()))  # the admin has second thoughts
    candidate.locator("button", has_text="Activate").click()
    admin.wait_for_timeout(300)
    assert asked and "Activate browser-candidate?" in asked[0]
    expect(candidate.locator("td").nth(1)).to_have_text("candidate")  # nothing happened
    admin.once("dialog", lambda d: d.accept())
    candidate.locator("button", has_text="Activate").click()
    expect(admin.locator(".flash", has_text="browser-candidate is now the active model.")).to_be_visible()
    candidate = admin.locator("#versions tbody tr", has_text="browser-candidate")
    expect(candidate.locator("td").nth(1)).to_have_text("active")
    expect(candidate.locator("button", has_text="Activate")).to_have_count(0)
    admin.screenshot(path=str(SHOTS / "13-admin-activated.png"), full_page=True)
    with session_scope() as s:
        assert registry.active_version(s).name == "browser-candidate"
        if before is not None:  # leave the session's active model as it was
            registry.activate(s, s.get(registry.ModelVersion, before.id))

"""Day one of a clinic: no model trained, a gallery seeded from its photo archive.

With no trained model active, a worker registers and activates the gallery model (the identity encoder and
nothing trained); a clinician's upload is then scored, and the case page ranks syndromes by the nearest
diagnosed patients and says so. As diagnosed, consented patients accumulate, the nightly run trains the first
model's heads once two syndromes have five patients each, promotes it through the guard against the gallery's
own ranking on held-out patients, and the sweep re-scores what the gallery ranked.

Real photos: faces/people (13 people, grouped by the identity pairs of its pivot file) stand in for patients of
four syndromes; ORL people with and without a synthetic hypertelorism warp stand in for two more. Real PostgreSQL,
SeaweedFS, Redis, Celery workers, gunicorn and Chromium.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sqlalchemy import select, update

from shared.db import session_scope
from shared.lifecycle import delete_case
from shared.modelops.registry import GALLERY_MODEL, ModelCache, activate, active_version
from shared.models import Case, Image, ModelStatus, ModelVersion, Result, TrainingRun
from shared.storage import get_storage
from shared.users import find_user
from tests.conftest import PASSWORD, Portal, new_user, run_cli, shared_data
from tests.test_browser import browser  # noqa: F401 - the Chromium fixture
from tests.test_catalog import ensure_catalog

pytestmark = pytest.mark.e2e

# Four syndromes for the people of faces/people (catalogue IDs, mapped from folder names by a labels file): none has
# the five patients a first model needs. Two more for ORL people: the warped ones and the others.
PEOPLE_SYNDROMES = ["ORPHA:904", "ORPHA:648", "OMIM:147920", "OMIM:180849"]
ORL_SYNDROMES = {"hypertelorism": "OMIM:117550", "unaffected": "OMIM:122470"}
ORL_PEOPLE = 8  # per ORL syndrome
ORL_PHOTOS = 4  # per ORL person
QUERY_PERSON = 0  # the person whose third photo the clinician uploads


def people_groups() -> list[list[str]]:
    """The photos of faces/people grouped by person (connected components of its same-person pairs), largest
    first."""
    folder = shared_data("faces", "people")
    with (folder / "face-recognition-pivot.csv").open() as fh:
        pairs = [(Path(r["file_x"]).name, Path(r["file_y"]).name) for r in csv.DictReader(fh) if r["decision"] == "Yes"]
    names = sorted({n for pair in pairs for n in pair})
    index = {n: i for i, n in enumerate(names)}
    rows, cols = zip(*((index[a], index[b]) for a, b in pairs), strict=True)
    _, labels = connected_components(coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(names),) * 2),
                                     directed=False)
    groups = [sorted(n for n, lab in zip(names, labels, strict=True) if lab == k) for k in set(labels.tolist())]
    return sorted(groups, key=lambda g: (-len(g), g))


def _write_labels(path: Path, mapping: dict[str, str]) -> Path:
    path.write_text("folder,syndrome\n" + "".join(f"{folder},{code}\n" for folder, code in mapping.items()))
    return path


def _phone_photo(source: Path, target: Path, side: int = 1280) -> Path:
    """``source`` as a phone would send it: at most ``side`` pixels a side, JPEG (the tests' upload limit is 2 MB)."""
    bgr = cv2.imread(str(source), cv2.IMREAD_COLOR)
    scale = min(1.0, side / max(bgr.shape[:2]))
    bgr = cv2.resize(bgr, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA) if scale < 1 else bgr
    cv2.imwrite(str(target), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    return target


def _people_archive(root: Path) -> tuple[Path, Path, Path]:
    """DIR/<syndrome>/<patient>/<photo> with two photos of each person; the query person's third photo is kept out.
    Returns the folder, its labels file and the query photo."""
    folder = root / "people"
    groups = people_groups()
    assert len(groups) >= 12, groups
    for n, photos in enumerate(groups):
        patient = folder / f"people-{n % len(PEOPLE_SYNDROMES)}" / f"PT-P{n:02d}"
        patient.mkdir(parents=True)
        for name in photos[:2]:
            _phone_photo(shared_data("faces", "people") / name, patient / name)
    query = _phone_photo(shared_data("faces", "people") / groups[QUERY_PERSON][2], root / "query.jpg")
    labels = _write_labels(root / "people.csv", {f"people-{i}": c for i, c in enumerate(PEOPLE_SYNDROMES)})
    return folder, labels, query


def _orl_archive(root: Path) -> tuple[Path, Path]:
    """ORL people s1-s16 (upscaled twice, as a phone photo would show them), half of them warped to
    hypertelorism: the same warp on every photo of a person, so the label is the person's."""
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.train.warps import UNAFFECTED, warp_face

    folder = root / "orl"
    rng = np.random.default_rng(0)
    pre = Preprocessor()
    try:
        for s in range(1, 2 * ORL_PEOPLE + 1):
            kind = "hypertelorism" if s <= ORL_PEOPLE else UNAFFECTED
            patient = folder / kind / f"PT-ORL{s:02d}"
            patient.mkdir(parents=True)
            for i in range(1, ORL_PHOTOS + 1):
                gray = cv2.imread(str(shared_data("faces", "orl") / f"s{s}" / f"{i}.pgm"), cv2.IMREAD_GRAYSCALE)
                rgb = cv2.cvtColor(cv2.resize(gray, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC),
                                   cv2.COLOR_GRAY2RGB)
                warped, _ = warp_face(rgb, pre.run(rgb).aligned.landmarks, kind, 1.0, rng)
                cv2.imwrite(str(patient / f"{i}.png"), cv2.cvtColor(warped, cv2.COLOR_RGB2BGR))
    finally:
        pre.close()
    return folder, _write_labels(root / "orl.csv", ORL_SYNDROMES)


def _settle(owner: str, timeout: float = 600) -> list[int]:
    """Wait until every photo of ``owner``'s cases left the pipeline; their ids."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as s:
            rows = s.execute(select(Image.id, Image.status).join(Case, Case.id == Image.case_id)
                             .where(Case.owner_id == find_user(s, owner).id)).all()
        if rows and all(status in ("done", "rejected", "failed") for _, status in rows):
            return [i for i, status in rows if status == "done"]
        time.sleep(1.0)
    raise AssertionError(f"photos of {owner} did not settle: {sorted({st for _, st in rows})}")


def _import(engines, folder: Path, labels: Path, owner: str) -> None:
    r = run_cli(engines, "import", "photos", str(folder), "--owner", owner, "--consent", "yes", "--labels",
                str(labels), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def clinic(engines, workers, web_server, tmp_path_factory):
    """A clinic with no trained model: whatever model the session's earlier tests left active is retired for the
    module and restored after it; the cases the module creates (consented and diagnosed) are deleted after it."""
    ensure_catalog()
    root = tmp_path_factory.mktemp("day-one")
    with session_scope() as s:
        before = active_version(s)
        before_id = before.id if before else None
        s.execute(update(ModelVersion).where(ModelVersion.status == ModelStatus.active.value)
                  .values(status=ModelStatus.retired.value))
    clinician = new_user()
    yield {"root": root, "clinician": clinician}
    with session_scope() as s:  # rows and objects, as an admin's delete does (no orphan left for later tests)
        for case in s.scalars(select(Case).where(Case.owner_id == find_user(s, clinician).id)).all():
            delete_case(s, get_storage(), case, None, "test module cleanup")
    with session_scope() as s:
        s.execute(update(ModelVersion).where(ModelVersion.status == ModelStatus.active.value)
                  .values(status=ModelStatus.retired.value))
        if before_id is not None:
            activate(s, s.get(ModelVersion, before_id))


def test_a_worker_with_no_trained_model_registers_the_gallery_model_once(clinic):
    """What a worker does on its first photo when no model is active (GESTALT_GALLERY_MODEL, on by default)."""
    with session_scope() as s:
        assert ModelCache(check_seconds=0).active(s, get_storage()) is None  # the setting off: photos wait
    loaded = []
    for _ in range(2):
        with session_scope() as s:
            loaded.append(ModelCache(check_seconds=0, gallery_fallback=True).active(s, get_storage()))
    assert loaded[0].name == loaded[1].name == GALLERY_MODEL and loaded[0].version_id == loaded[1].version_id
    assert loaded[0].model.members == [] and loaded[0].inputs  # nothing trained; it reads the chip and the cuts
    with session_scope() as s:
        galleries = s.scalars(select(ModelVersion).where(ModelVersion.name == GALLERY_MODEL)).all()
        assert len(galleries) == 1 and galleries[0].status == "active" and galleries[0].config["backbone"] == "none"


def test_a_new_clinic_ranks_by_its_gallery_and_then_trains_its_first_model(
        clinic, engines, web_server, browser):  # noqa: F811
    from shared.modelops.retrain import run_retrain

    clinician, root = clinic["clinician"], clinic["root"]
    with session_scope() as s:
        assert ModelCache(check_seconds=0, gallery_fallback=True).active(s, get_storage()).name == GALLERY_MODEL
    # The clinic's archive: thirteen diagnosed, consented patients of four syndromes, imported as the clinician's.
    folder, labels, query = _people_archive(root)
    _import(engines, folder, labels, clinician)
    assert len(_settle(clinician)) >= 24

    # Not enough for a first model: the nightly run says so and the gallery model stays.
    run = run_retrain("beat")
    with session_scope() as s:
        row = s.get(TrainingRun, run)
        assert row.status == "skipped" and row.decision.startswith("the gallery model stays"), row.decision
        assert active_version(s).name == GALLERY_MODEL

    # The clinician's new photo of one of those patients is scored, and ranked by the gallery.
    portal = Portal(web_server, clinician)
    case_id = portal.create_case("PT-NEW")
    assert portal.upload(case_id, [(query.name, query.read_bytes())]).status_code == 201
    payload = portal.wait(case_id)
    image = payload["images"][0]
    assert image["status"] == "done" and image["result"]["model_version"]["name"] == GALLERY_MODEL, image
    result = payload["case_result"]
    assert result["gallery_only"]["patients"] >= 13 and result["gallery_only"]["syndromes"] >= len(PEOPLE_SYNDROMES)
    expected = PEOPLE_SYNDROMES[QUERY_PERSON % len(PEOPLE_SYNDROMES)]
    top = result["ranking"][0]
    assert expected in (top["omim"], top["orpha"]), result["ranking"][:3]
    nearest = payload["gallery"]["patients"][0]
    assert nearest["own"] and expected in (nearest["omim"], nearest["orpha"]) and nearest["similarity"] > 0.9
    assert payload["gallery"]["ood"] is not None and not payload["gallery"]["ood"]["unusual"]

    page = browser.new_page(viewport={"width": 1024, "height": 1366})
    try:
        page.goto(web_server + "/login")
        page.fill("input[name=email]", clinician)
        page.fill("input[name=password]", PASSWORD)
        page.click("main button[type=submit]")
        page.wait_for_url(web_server + "/")
        page.goto(f"{web_server}/cases/{case_id}")
        line = page.locator("#case-ranking-body")
        line.locator("table.ranking td.name").first.wait_for(timeout=30_000)  # the page's script drew the ranking
        text = line.inner_text()
        assert (f"Ranked by similarity to {result['gallery_only']['patients']} diagnosed patients of "
                f"{result['gallery_only']['syndromes']} syndromes; no trained model yet") in text, text
        assert top["name"] in text
    finally:
        page.close()

    # More diagnoses arrive: two syndromes with eight patients each. The nightly run trains the first model's heads
    # and promotes them over the gallery's ranking on held-out patients.
    orl, orl_labels = _orl_archive(root)
    _import(engines, orl, orl_labels, clinician)
    _settle(clinician)
    with session_scope() as s:
        gallery_id = active_version(s).id
    run = run_retrain("beat")
    with session_scope() as s:
        row = s.get(TrainingRun, run)
        assert row.status == "promoted", (row.decision, row.counts)
        assert row.base_version_id == gallery_id and len(row.counts["new_classes"]) == 2, row.counts
        assert row.metrics["candidate"]["per_image"]["top1"]["value"] >= \
            row.metrics["active"]["per_image"]["top1"]["value"] - 0.02
        first = active_version(s)
        assert first.id == row.candidate_version_id and first.name == f"{GALLERY_MODEL}+r{run}"
        assert first.config["parent_version_id"] == gallery_id and first.config["backbone"] == "encoder"
        assert sum(first.config["weights"].values()) == pytest.approx(1.0, abs=1e-3)  # shares, rounded
        assert s.get(ModelVersion, gallery_id).status == "retired"
        first_name, first_weights = first.name, dict(first.config["weights"])
        print(f"first model {first_name}: {row.decision}; weights {first_weights}; counts {row.counts}")

    admin = Portal(web_server, new_user("admin"))
    models = admin.http.get(web_server + "/admin/models").text
    assert "gallery only: ranks by the nearest diagnosed patients" in models and first_name in models
    assert row.decision in models.replace("&gt;", ">")

    # The sweep re-scores what the gallery ranked with the trained model.
    from worker.tasks.maintenance import sweep

    swept = sweep.apply_async().get(timeout=60)
    assert swept["woken"] >= 1, swept
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with session_scope() as s:
            scored = s.scalars(select(Result.model_version_id).where(Result.image_id == image["id"])).all()
        if row.candidate_version_id in scored:
            break
        time.sleep(1.0)
    payload = portal.wait(case_id)
    assert payload["case_result"]["model_version"]["name"] == first_name, payload["case_result"]
    assert payload["case_result"].get("gallery_only") is None
    assert payload["images"][0]["result"]["weights"] == first_weights

"""Gallery matching: similar diagnosed patients through the real pipeline, with what a clinician may see."""
from __future__ import annotations

import numpy as np
import pytest

from shared.ml.members.gallery import Gallery, gallery_vectors
from tests.conftest import Portal, activate, new_user, shared_data

pytestmark = pytest.mark.e2e


def test_match_ranks_patients_by_their_best_photo_and_syndromes_by_their_nearest_patient():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 2, 16)).astype(np.float32)  # three faces, two regions
    photos = np.stack([base[0], base[0] + 0.05, base[1], base[2], base[1] + 0.3])
    g = Gallery("sha", ("a", "b"), gallery_vectors(photos), np.arange(5), np.array([10, 10, 11, 12, 13]),
                np.array([1, 1, 2, 3, 2]), {1: {"name": "A"}, 2: {"name": "B"}, 3: {"name": "C"}})
    out = g.match(base[1] + 0.01, patients=3)
    assert [p["case_id"] for p in out["patients"]][:2] == [11, 13] and len(out["patients"]) == 3
    assert [s["syndrome_id"] for s in out["syndromes"]][:1] == [2] and out["syndromes"][0]["patients"] == 2
    assert out["patients"][0]["name"] == "B" and out["gallery_patients"] == 4
    assert [p["case_id"] for p in g.match(base[1], exclude_case=11)["patients"]][0] == 13
    assert np.allclose(np.linalg.norm(gallery_vectors(photos), axis=1), 1)


def test_similar_patients_on_the_result_page(engines, workers, web_server, small_model):
    from tests.test_catalog import ensure_catalog

    ensure_catalog()
    orl = shared_data("faces", "orl")
    activate(small_model)  # the gallery matches on the identity encoder's descriptors, whatever the model's classes

    other = Portal(web_server, new_user())  # another clinician's patients
    viewer = Portal(web_server, new_user())

    def case_with(portal, ref, photos):
        case_id = portal.create_case(ref)
        for name, i in photos:
            assert portal.upload(case_id, [(f"{i}.pgm", (orl / name / f"{i}.pgm").read_bytes())]).status_code == 201
        return case_id

    kabuki = case_with(other, "PT-GAL-OTHER", [("s5", 1), ("s5", 2)])
    no_consent = case_with(other, "PT-GAL-NOCONSENT", [("s5", 3)])
    own = case_with(viewer, "PT-GAL-OWN", [("s7", 1), ("s7", 2)])
    # The same photo as one of the other clinician's patient's: that patient must come first.
    query = case_with(viewer, "PT-GAL-QUERY", [("s5", 2)])
    for portal, case_id in ((other, kabuki), (other, no_consent), (viewer, own), (viewer, query)):
        assert all(i["status"] == "done" for i in portal.wait(case_id, timeout=240)["images"])
    for portal, case_id, syndrome, consent in ((other, kabuki, "OMIM:147920", True),
                                               (other, no_consent, "OMIM:147920", False),
                                               (viewer, own, "ORPHA:2322", True)):
        r = portal.http.post(f"{web_server}/api/v1/cases/{case_id}/diagnosis", json={
            "syndrome": syndrome, "kind": "clinical", "consent": consent},
            headers={"X-CSRFToken": portal.csrf("/")})
        assert r.status_code == 200, r.text

    gallery = viewer.case(query)["gallery"]
    assert gallery["model_version"]["name"] == small_model
    # The model has an identity member, so the gallery matches on the face encoder's descriptors, which are the
    # same under every model: diagnosed patients that other tests left in the shared database may be in it too.
    assert gallery["gallery_patients"] >= 2
    first = gallery["patients"][0]
    mine = [p for p in gallery["patients"] if p["own"]]
    assert len(mine) == 1
    second = mine[0]
    assert first["name"] == "Kabuki Syndrome 1" and "KMT2D" in first["genes"] and first["own"] is False
    assert set(first) == {"syndrome_id", "similarity", "name", "omim", "orpha", "genes", "own"}  # no case, no photo
    assert second["own"] is True and second["case_url"] == f"/cases/{own}" and second["orpha"] == "ORPHA:2322"
    assert first["similarity"] == pytest.approx(1.0, abs=1e-3) and first["similarity"] > second["similarity"]
    syndromes = [s["name"] for s in gallery["syndromes"]]
    assert syndromes[0] == "Kabuki Syndrome 1" and "Kabuki syndrome" in syndromes
    assert all(r["genes"] is not None for r in viewer.case(query)["images"][0]["result"]["ranking"])

    page = viewer.http.get(f"{web_server}/cases/{query}").text
    assert 'id="similar-patients"' in page and f'href="/cases/{own}">your case' in page
    assert "PT-GAL-OTHER" not in page and f"/cases/{kabuki}" not in page and "KMT2D" in page
    # The other clinician sees their own patient linked, and the viewer's patient as a diagnosis only.
    probe = case_with(other, "PT-GAL-PROBE", [("s7", 1)])
    other.wait(probe, timeout=240)
    seen = other.case(probe)["gallery"]["patients"]
    assert seen[0]["name"] == "Kabuki syndrome" and seen[0]["own"] is False and "case_url" not in seen[0]
    assert any(p["own"] and p["case_url"] == f"/cases/{kabuki}" for p in seen)

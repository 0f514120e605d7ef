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
    g = Gallery((("a", "sha"), ("b", "sha")), gallery_vectors(photos), np.arange(5), np.array([10, 10, 11, 12, 13]),
                np.array([1, 1, 2, 3, 2]), {1: {"name": "A"}, 2: {"name": "B"}, 3: {"name": "C"}})
    out = g.match(gallery_vectors((base[1] + 0.01)[None])[0], patients=3)
    assert [p["case_id"] for p in out["patients"]][:2] == [11, 13] and len(out["patients"]) == 3
    assert [s["syndrome_id"] for s in out["syndromes"]][:1] == [2] and out["syndromes"][0]["patients"] == 2
    assert out["patients"][0]["name"] == "B" and out["gallery_patients"] == 4
    assert [p["case_id"] for p in g.match(gallery_vectors(base[1][None]), exclude_case=11)["patients"]][0] == 13
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
    # The other clinician's patient is the query's own person (the same photo): left out, and counted.
    assert gallery["withheld"] >= 1 and gallery["gallery_patients"] >= 1
    mine = [p for p in gallery["patients"] if p["own"]]
    assert len(mine) == 1
    second = mine[0]
    assert all(p["own"] or p["similarity"] < 0.95 for p in gallery["patients"]), gallery["patients"]
    assert all(set(p) <= {"syndrome_id", "similarity", "name", "omim", "orpha", "genes", "own"}
               for p in gallery["patients"] if not p["own"])  # no case, no photo
    assert second["own"] is True and second["case_url"] == f"/cases/{own}" and second["orpha"] == "ORPHA:2322"
    assert all(s["similarity"] < 0.95 for s in gallery["syndromes"])
    assert all(r["genes"] is not None for r in viewer.case(query)["images"][0]["result"]["ranking"])

    page = viewer.http.get(f"{web_server}/cases/{query}").text
    assert 'id="similar-patients"' in page and f'href="/cases/{own}">your case' in page
    assert 'id="similar-patients-withheld"' in page and "were left out" in page
    assert "PT-GAL-OTHER" not in page and f"/cases/{kabuki}" not in page
    # The other clinician sees their own patient linked, and the viewer's patient (the probe's own person)
    # not at all.
    probe = case_with(other, "PT-GAL-PROBE", [("s7", 1)])
    other.wait(probe, timeout=240)
    seen = other.case(probe)["gallery"]
    assert seen["withheld"] >= 1 and not any(p.get("orpha") == "ORPHA:2322" and p["similarity"] > 0.95
                                             for p in seen["patients"])
    assert any(p["own"] and p["case_url"] == f"/cases/{kabuki}" for p in seen["patients"])


def _descriptor(rng, base=None, noise: float = 0.0):
    d = rng.normal(size=128) if base is None else base + rng.normal(size=128) * noise / np.sqrt(128)
    return (d / np.linalg.norm(d) * 0.9).astype(np.float32)  # dlib's descriptors have norms near 1


def test_other_owners_patients_who_are_the_same_person_are_left_out(engines):
    """Stored descriptors of three diagnosed, consented patients: another clinician's patient who is the query's
    person (distance 0.05), another clinician's patient who is someone else, and the viewer's own patient who is
    the query's person. Only the first is left out, and only for anyone but its owner."""
    from sqlalchemy import delete, select

    from shared.db import session_scope
    from shared.ml.formats.vectors import pack
    from shared.modelops.same_person import withhold_same_person
    from shared.models import Case, Diagnosis, Image, ImageFeature, ModelVersion, Syndrome
    from shared.users import find_user
    from web import create_app
    from web.results import gallery_payload

    rng = np.random.default_rng(7)
    key = f"test-identity-{rng.integers(1 << 62)}"  # nobody else's descriptors
    person, stranger = _descriptor(rng), _descriptor(rng)
    with session_scope() as s:
        viewer, other = find_user(s, new_user()).id, find_user(s, new_user()).id
        syndrome = s.scalars(select(Syndrome).order_by(Syndrome.id)).first() or Syndrome(name="Test syndrome (gal)")
        s.add(syndrome)
        config = {"members": {"identity": {"encoder_sha": key, "feature_key": key}}}
        version = ModelVersion(name=f"gal-{key[-12:]}", arch="test", checkpoint_key="none", checkpoint_sha256="0" * 64,
                               status="candidate", config=config, classes=[])
        cases = {name: Case(owner_id=owner, patient_ref=f"PT-SP-{name}", sex="female")
                 for name, owner in (("query", viewer), ("twin", other), ("stranger", other), ("own", viewer))}
        s.add_all([version, *cases.values()])
        s.flush()
        for i, (name, vector) in enumerate((("query", person), ("twin", _descriptor(rng, person, 0.05)),
                                            ("stranger", stranger), ("own", _descriptor(rng, person, 0.05)))):
            image = Image(case_id=cases[name].id, sha256=f"{i + 0xa0:02x}" * 32, object_key="originals/none.png",
                          content_type="image/png", width=100, height=100, status="done")
            s.add(image)
            s.flush()
            s.add(ImageFeature(image_id=image.id, region="identity", backbone_sha=key, vector=pack(vector)))
            if name != "query":
                s.add(Diagnosis(case_id=cases[name].id, syndrome_id=syndrome.id, kind="clinical", consent=True))
        ids = {name: c.id for name, c in cases.items()}
    app = create_app({"RATELIMIT_STORAGE_URI": "memory://"})
    try:
        with session_scope() as s, app.test_request_context():
            version = s.scalars(select(ModelVersion).where(ModelVersion.config["members"]["identity"]["feature_key"]
                                                           .as_string() == key)).one()
            payload = gallery_payload(s, s.get(Case, ids["query"]), version, viewer)
            assert payload["withheld"] == 1 and payload["gallery_patients"] == 2
            shown = sorted((p["own"], round(p["similarity"], 1)) for p in payload["patients"])
            assert shown[0][0] is False and shown[0][1] < 0.5 and shown[1] == (True, 1.0)  # the stranger; the own twin
            # The twin's owner sees their own patient; an admin, not their owner, does not.
            _, withheld = withhold_same_person(s, _gallery(s, key), ids["query"], other, version.config)
            assert withheld == 1  # from the other owner's side, the viewer's own twin is the one left out
            # Without the query's descriptors nobody can rule the same person out: every other owner's patient goes.
            version.config = {"backbone_sha": key, "regions": ["identity"]}
            _, withheld = withhold_same_person(s, _gallery(s, key), ids["query"], viewer, version.config)
            assert withheld == 2
            s.rollback()
    finally:
        with session_scope() as s:
            s.execute(delete(Case).where(Case.id.in_(ids.values())))
            s.execute(delete(ModelVersion).where(ModelVersion.name == f"gal-{key[-12:]}"))


def _gallery(session, key: str):
    from shared.modelops.gallery import load_gallery

    return load_gallery(session, (("identity", key),))

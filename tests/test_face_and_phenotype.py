"""The case page ranks syndromes by the case's HPO terms, and jointly with the face once a fitted combination
is installed, showing each part's contribution and where the face part comes from: the facial model, diagnosed
gallery patients (syndromes the model has no class for), or neither."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
from sqlalchemy import delete, select

from shared.db import session_scope
from shared.ml.formats.vectors import pack
from shared.models import Case, Diagnosis, Image, ImageFeature, ModelVersion, Result, Syndrome
from shared.storage import PHENOTYPE_COMBINER_KEY, get_storage
from shared.users import find_user
from tests.conftest import Portal, new_user
from tests.test_catalog import ensure_catalog

KABUKI, DOWN, KABUKI2 = "OMIM:147920", "OMIM:190685", "OMIM:300867"


def _kabuki_terms(n: int = 6) -> list[str]:
    """The most specific of Kabuki syndrome 1's own annotations (what a clinician would record)."""
    from shared.ml.phenotype.ranking import shared_ranker

    index = shared_ranker().index
    disease = index.dis_codes.tolist().index(KABUKI)
    terms = index.ann[disease].indices
    specific = sorted(terms, key=lambda t: -index.ic[t])[:n]
    return [str(index.term_ids[t]) for t in specific]


@pytest.fixture
def scored_case(engines):
    """A case with Kabuki terms and one photo that a (stand-in) facial model scored Kabuki 0.3, Down 0.7, and a
    gallery of two diagnosed, consented patients under that model's backbone: one with Kabuki syndrome 2 (no
    facial-model class) whose cached features equal the case photo's, one with Down syndrome."""
    ensure_catalog()
    email = new_user()
    rng = np.random.default_rng(0)
    backbone = f"test-face-pheno-{rng.integers(1 << 62)}"  # nobody else's gallery
    query, down_face = rng.normal(size=(2, 320)).astype(np.float32)
    with session_scope() as s:
        kabuki = s.scalars(select(Syndrome).where(Syndrome.omim == KABUKI)).one()
        down = s.scalars(select(Syndrome).where(Syndrome.omim == DOWN)).one()
        kabuki2 = s.scalars(select(Syndrome).where(Syndrome.omim == KABUKI2)).one()
        owner = find_user(s, email).id
        version = ModelVersion(name=f"face-pheno-{email[:20]}", arch="test", checkpoint_key="none",
                               checkpoint_sha256="0" * 64, status="candidate",
                               config={"backbone_sha": backbone, "regions": ["face"]},
                               classes=[{"syndrome_id": kabuki.id, "name": kabuki.name},
                                        {"syndrome_id": down.id, "name": down.name}])
        case = Case(owner_id=owner, patient_ref="PT-FP", sex="male", age_years=5, hpo_terms=_kabuki_terms())
        gallery = [Case(owner_id=owner, patient_ref=f"PT-FP-GAL{i}", sex="female", age_years=7) for i in (1, 2)]
        s.add_all([version, case, *gallery])
        s.flush()
        images = [Image(case_id=c.id, sha256=f"{i:02x}" * 32, object_key="originals/none.png",
                        content_type="image/png", width=100, height=100, status="done")
                  for i, c in enumerate([case, *gallery], start=0xe0)]
        s.add_all(images)
        s.flush()
        s.add(Result(image_id=images[0].id, model_version_id=version.id, scores=[0.3, 0.7], ranking=[]))
        for image, vector in zip(images, (query, query, down_face), strict=True):
            s.add(ImageFeature(image_id=image.id, region="face", backbone_sha=backbone, vector=pack(vector)))
        for c, syndrome in zip(gallery, (kabuki2, down), strict=True):
            s.add(Diagnosis(case_id=c.id, syndrome_id=syndrome.id, kind="clinical", consent=True))
        ids = case.id, version.id, [c.id for c in gallery]
    yield email, ids[0]
    with session_scope() as s:
        s.execute(delete(Case).where(Case.id.in_([ids[0], *ids[2]])))
        s.execute(delete(ModelVersion).where(ModelVersion.id == ids[1]))


def test_phenotype_and_joint_rankings_on_the_case(engines, web_server, scored_case):
    import shared.services.phenotype

    email, case_id = scored_case
    portal = Portal(web_server, email)
    storage = get_storage()
    storage.delete(PHENOTYPE_COMBINER_KEY) if storage.exists(PHENOTYPE_COMBINER_KEY) else None
    payload = portal.case(case_id)["phenotype"]
    codes = [r["code"] for r in payload["phenotype"]]
    assert KABUKI in codes[:3], codes
    assert payload["joint"] is None and payload["facial_classes"] == 2
    page = portal.http.get(f"{web_server}/cases/{case_id}").text
    assert 'id="phenotype-ranking"' in page and "gestalt evaluate-phenotype --install" in page

    # A fitted combination (learned weights, as `gestalt evaluate-phenotype --install` stores them).
    from shared.ml.phenotype.joint import Combiner

    combiner = Combiner({"similarity": 0.7, "adjusted": 1.6, "z": 0.9, "log_rank_similarity": 0.3,
                         "log_rank_adjusted": 0.4, "facial_model": 8.4, "face_log_prob": 0.9},
                        meta={"trained_on": "simulated cases"})
    storage.put(PHENOTYPE_COMBINER_KEY, json.dumps(combiner.to_dict()).encode(), "application/json")
    local = shared.services.phenotype.installed_combiner()
    assert local is not None and local.weights == combiner.weights
    try:
        joint = portal.case(case_id)["phenotype"]["joint"]
        assert joint, "the server did not pick up the installed combination"
        top = {r["code"]: r for r in joint}
        assert joint[0]["code"] == KABUKI  # phenotype outweighs the face's 0.7 for Down
        assert top[KABUKI]["facial_model"] and top[KABUKI]["face_probability"] == pytest.approx(0.3)
        assert top[KABUKI]["face_source"] == "facial_model"
        assert all(not r["facial_model"] for r in joint if r["code"] not in (KABUKI, DOWN))
        assert top[KABUKI]["phenotype_part"] > 0 and top[KABUKI]["score"] == pytest.approx(
            top[KABUKI]["phenotype_part"] + top[KABUKI]["face_part"])
        # A combination saved before the gallery features existed: no weight for them, no gallery part.
        assert all(r["face_source"] in ("facial_model", None) for r in joint)
        assert all(r["face_source"] is None and r["face_part"] == 0 for r in joint if r["code"] not in (KABUKI, DOWN))
        page = portal.http.get(f"{web_server}/cases/{case_id}").text
        assert 'id="joint-ranking"' in page and "phenotype alone" in page and "gallery patients (" not in page

        # With gallery weights: Kabuki syndrome 2 has no facial-model class but a diagnosed patient whose photo
        # matches; its face part comes from that gallery patient. Kabuki 1 and Down keep the facial model's.
        gallery_weights = {"in_gallery": -1.7, "gallery_similarity": 20.7, "gallery_log_rank": -0.15}
        with_gallery = Combiner({**combiner.weights, **gallery_weights}, meta={"trained_on": "simulated cases"})
        storage.put(PHENOTYPE_COMBINER_KEY, json.dumps(with_gallery.to_dict()).encode(), "application/json")
        payload = portal.case(case_id)["phenotype"]
        assert payload["gallery_syndromes"] == 2
        top = {r["code"]: r for r in payload["joint"]}
        k2 = top[KABUKI2]
        assert k2["face_source"] == "gallery" and not k2["facial_model"] and k2["face_probability"] is None
        assert k2["gallery_similarity"] == pytest.approx(1.0, abs=1e-3)
        assert k2["face_part"] == pytest.approx(-1.7 + 20.7 * k2["gallery_similarity"], abs=1e-3)  # rank 1: log 0
        assert payload["joint"][0]["code"] == KABUKI and k2["rank"] <= 3  # outside the top 10 without the gallery
        assert top[KABUKI]["face_source"] == "facial_model" and top[KABUKI]["gallery_similarity"] is None
        assert all(r["face_source"] is None for r in payload["joint"] if r["code"] not in (KABUKI, DOWN, KABUKI2))
        page = portal.http.get(f"{web_server}/cases/{case_id}").text
        assert "gallery patients (nearest 1.00)" in page and "facial model</span>" in page
    finally:
        storage.delete(PHENOTYPE_COMBINER_KEY)


def _loaded(portal: Portal, case_id: int, timeout: float = 120) -> dict:
    """The case's payload once the server's phenotype index has loaded (its first load may take a while)."""
    deadline = time.monotonic() + timeout
    while True:
        payload = portal.case(case_id)
        if "error" not in (payload["phenotype"] or {}) or time.monotonic() > deadline:
            return payload
        time.sleep(1)


def test_a_case_scored_by_two_models_is_ranked_by_one(engines, web_server):
    """One photo scored by the active model, two by an older one: the ranked syndromes, the printed report and the
    joint ranking all come from the active model and say so (the model, the one photo, the two left out)."""
    import torch

    from shared.ml.formats.ranking import rank
    from shared.ml.members.casia import casia_only
    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.phenotype import Combiner
    from shared.modelops import registry

    ensure_catalog()
    email = new_user()
    storage = get_storage()
    with session_scope() as s:
        kabuki = s.scalars(select(Syndrome).where(Syndrome.omim == KABUKI)).one()
        down = s.scalars(select(Syndrome).where(Syndrome.omim == DOWN)).one()
        classes = [{"syndrome_id": kabuki.id, "name": kabuki.name}, {"syndrome_id": down.id, "name": down.name}]
        before = registry.active_version(s)
        versions = []
        for name in ("older", "active"):
            torch.manual_seed(0)
            net = RegionalEnsemble(("full_face",), 2, width=0.125).eval()
            version = registry.register_model(s, storage, casia_only(net, ["x-one", "x-two"]), {},
                                              name=f"two-models-{name}-{email[:16]}")
            version.classes = classes
            versions.append(version)
        older, active = versions
        registry.activate(s, active)
        case = Case(owner_id=find_user(s, email).id, patient_ref="PT-TWO-MODELS", sex="female", age_years=4,
                    hpo_terms=_kabuki_terms())
        s.add(case)
        s.flush()
        images = [Image(case_id=case.id, sha256=f"{i:02x}" * 32, object_key="originals/none.png",
                        content_type="image/png", width=100, height=100, status="done") for i in (0xd1, 0xd2, 0xd3)]
        s.add_all(images)
        s.flush()
        for image, version, scores in zip(images, (active, older, older), ([0.9, 0.1], [0.2, 0.8], [0.2, 0.8]),
                                          strict=True):
            s.add(Result(image_id=image.id, model_version_id=version.id, scores=scores,
                         ranking=rank(np.asarray(scores), classes)))
        ids = case.id, images[0].id, active.id, active.name, before.id if before else None
    case_id, first, active_id, active_name, before_id = ids
    combiner = Combiner({"similarity": 0.7, "adjusted": 1.6, "z": 0.9, "log_rank_similarity": 0.3,
                         "log_rank_adjusted": 0.4, "facial_model": 8.4, "face_log_prob": 0.9}, meta={})
    storage.put(PHENOTYPE_COMBINER_KEY, json.dumps(combiner.to_dict()).encode(), "application/json")
    try:
        portal = Portal(web_server, email)
        payload = _loaded(portal, case_id)
        ranking = payload["case_result"]
        assert ranking["model_version"] == {"id": active_id, "name": active_name}
        assert (ranking["photos"], ranking["image_ids"], ranking["left_out"]) == (1, [first], 2)
        assert ranking["ranking"][0]["syndrome_id"] == payload["images"][0]["result"]["ranking"][0]["syndrome_id"]
        assert ranking["ranking"][0]["score"] == pytest.approx(0.9)
        phenotype = payload["phenotype"]
        assert (phenotype["facial_model"], phenotype["facial_photos"]) == (active_name, 1)
        joint = {r["code"]: r for r in phenotype["joint"]}
        assert joint[KABUKI]["face_probability"] == pytest.approx(0.9)  # the active model's, not the older mean
        page = portal.http.get(f"{web_server}/cases/{case_id}").text
        assert f"One photo, model {active_name}" in page and "Left out: 2 photos scored by another model only" in page
        assert f'<span id="joint-facial-model">{active_name}</span> (one photo' in page
        report = portal.http.get(f"{web_server}/cases/{case_id}/report").text
        assert f"Model {active_name}" in report
    finally:
        storage.delete(PHENOTYPE_COMBINER_KEY)
        with session_scope() as s:
            s.execute(delete(Case).where(Case.id == case_id))
            if before_id is not None:
                registry.activate(s, s.get(ModelVersion, before_id))
            else:
                s.get(ModelVersion, active_id).status = "retired"


def test_a_combination_the_store_refuses_is_an_error_an_admin_sees(engines, monkeypatch, caplog):
    """An AccessDenied on the installed combination is not "none installed": it is logged as an error and the
    admin's models page says what the object store answered."""
    import re

    import shared.services.phenotype
    from shared import storage as storage_module
    from shared.config import get_settings
    from tests.conftest import PASSWORD
    from web import create_app

    s = get_settings()
    refused = storage_module.Storage(s.s3_endpoint, s.s3_access_key, "not-the-secret-key", s.s3_bucket,
                                     s.s3_secure, s.s3_region)
    monkeypatch.setattr(storage_module, "_storage", refused)
    caplog.set_level("ERROR", logger="shared.services.phenotype")
    with pytest.raises(shared.services.phenotype.CombinerUnavailable, match="AccessDenied"):
        shared.services.phenotype.installed_combiner()
    assert f"phenotype combiner {PHENOTYPE_COMBINER_KEY} unreadable: AccessDenied" in caplog.text

    client = create_app().test_client()
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', client.get("/login").text).group(1)
    client.post("/login", data={"csrf_token": token, "email": new_user("admin"), "password": PASSWORD})
    page = client.get("/admin/models").text
    status = re.search(r'<p class="meta" id="combiner-status">(.*?)</p>', page, re.S).group(1)
    assert "the joint ranking is unavailable" in status and "(AccessDenied)" in status
    assert "none installed" not in status

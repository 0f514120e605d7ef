"""The case page ranks syndromes by the case's HPO terms, and jointly with the face once a fitted combination
is installed, showing each part's contribution and where the face part comes from: the facial model, diagnosed
gallery patients (syndromes the model has no class for), or neither."""
from __future__ import annotations

import json

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
    import web.phenotype

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
    local = web.phenotype.installed_combiner()
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

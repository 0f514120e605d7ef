"""The case page ranks syndromes by the case's HPO terms, and jointly with the face once a fitted combination
is installed, showing each part's contribution."""
from __future__ import annotations

import json

import pytest
from sqlalchemy import delete, select

from shared.db import session_scope
from shared.models import Case, Image, ModelVersion, Result, Syndrome
from shared.storage import PHENOTYPE_COMBINER_KEY, get_storage
from shared.users import find_user
from tests.conftest import Portal, new_user
from tests.test_catalog import ensure_catalog

KABUKI, DOWN = "OMIM:147920", "OMIM:190685"


def _kabuki_terms(n: int = 6) -> list[str]:
    """The most specific of Kabuki syndrome 1's own annotations (what a clinician would record)."""
    from shared.ml.phenotype import shared_ranker

    index = shared_ranker().index
    disease = index.dis_codes.tolist().index(KABUKI)
    terms = index.ann[disease].indices
    specific = sorted(terms, key=lambda t: -index.ic[t])[:n]
    return [str(index.term_ids[t]) for t in specific]


@pytest.fixture
def scored_case(engines):
    """A case with Kabuki terms and one photo that a (stand-in) facial model scored Kabuki 0.3, Down 0.7."""
    ensure_catalog()
    email = new_user()
    with session_scope() as s:
        kabuki = s.scalars(select(Syndrome).where(Syndrome.omim == KABUKI)).one()
        down = s.scalars(select(Syndrome).where(Syndrome.omim == DOWN)).one()
        version = ModelVersion(name=f"face-pheno-{email[:20]}", arch="test", checkpoint_key="none",
                               checkpoint_sha256="0" * 64, status="candidate",
                               classes=[{"syndrome_id": kabuki.id, "name": kabuki.name},
                                        {"syndrome_id": down.id, "name": down.name}])
        case = Case(owner_id=find_user(s, email).id, patient_ref="PT-FP", sex="male", age_years=5,
                    hpo_terms=_kabuki_terms())
        s.add_all([version, case])
        s.flush()
        image = Image(case_id=case.id, sha256="ef" * 32, object_key="originals/none.png", content_type="image/png",
                      width=100, height=100, status="done")
        s.add(image)
        s.flush()
        s.add(Result(image_id=image.id, model_version_id=version.id, scores=[0.3, 0.7], ranking=[]))
        ids = case.id, version.id
    yield email, ids[0]
    with session_scope() as s:
        s.execute(delete(Case).where(Case.id == ids[0]))
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
    from shared.ml.phenotype import Combiner

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
        assert all(not r["facial_model"] for r in joint if r["code"] not in (KABUKI, DOWN))
        assert top[KABUKI]["phenotype_part"] > 0 and top[KABUKI]["score"] == pytest.approx(
            top[KABUKI]["phenotype_part"] + top[KABUKI]["face_part"])
        page = portal.http.get(f"{web_server}/cases/{case_id}").text
        assert 'id="joint-ranking"' in page and "no facial model" in page
    finally:
        storage.delete(PHENOTYPE_COMBINER_KEY)

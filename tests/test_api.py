"""The JSON API with token auth, its OpenAPI document, and a bounded schemathesis run (no server errors)."""
from __future__ import annotations

import io
import subprocess
import sys

import pytest
import requests
from PIL import Image
from skimage import data

from shared.db import session_scope
from shared.users import create_token, find_user
from tests.conftest import new_user


@pytest.fixture(scope="module")
def token(engines):
    email = new_user()
    with session_scope() as s:
        _, secret = create_token(s, find_user(s, email), "api-test")
    return secret


def test_api_case_flow_with_a_token(web_server, token):
    auth = {"Authorization": f"Bearer {token}"}
    api = web_server + "/api/v1"
    r = requests.post(f"{api}/cases", json={"patient_ref": "PT-API-1", "sex": "male", "age_years": 4}, headers=auth)
    assert r.status_code == 201, r.text
    case_id = r.json()["id"]
    bad = requests.post(f"{api}/cases", json={"patient_ref": "John Smith"}, headers=auth)
    assert bad.status_code == 400 and "pseudonymous" in bad.json()["error"]
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG")
    r = requests.post(f"{api}/cases/{case_id}/images", files={"photo": ("a.jpg", buf.getvalue())}, headers=auth)
    assert r.status_code == 201 and r.json()["images"][0]["status"] == "queued"
    r = requests.post(f"{api}/cases/{case_id}/images", files={"photo": ("a.jpg", b"nope")}, headers=auth)
    assert r.status_code == 415 and "not an image" in r.json()["error"]
    listed = requests.get(f"{api}/cases", headers=auth).json()["cases"]
    assert any(c["id"] == case_id and c["photos"] == 1 for c in listed)
    assert requests.get(f"{api}/cases/999999", headers=auth).json() == {"error": "not found, or not yours"}
    assert requests.delete(f"{api}/cases/{case_id}", headers=auth).status_code == 405
    spec = requests.get(f"{api}/openapi.json", headers=auth).json()
    assert spec["openapi"] == "3.1.0" and "/api/v1/cases/{case_id}/images" in spec["paths"]
    assert requests.get(f"{api}/openapi.json").status_code == 401


def test_schemathesis_finds_no_server_errors(web_server, token):
    """A bounded property-based run over every operation in the OpenAPI document."""
    r = subprocess.run([sys.executable, "-m", "schemathesis.cli", "run", f"{web_server}/api/v1/openapi.json",
                        "-H", f"Authorization: Bearer {token}", "--checks", "not_a_server_error",
                        "--max-examples", "25", "--seed", "20261127", "--request-timeout", "30"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_diagnosis_with_unicode_digits_is_a_clear_400(web_server, token):
    """Found by schemathesis: "¹".isdigit() is True but int("¹") fails."""
    auth = {"Authorization": f"Bearer {token}"}
    case_id = requests.post(f"{web_server}/api/v1/cases", json={"patient_ref": "PT-UNI"}, headers=auth).json()["id"]
    r = requests.post(f"{web_server}/api/v1/cases/{case_id}/diagnosis", json={"syndrome": "\u00b9"}, headers=auth)
    assert r.status_code == 400 and "unknown syndrome" in r.json()["error"]


@pytest.mark.parametrize("body", [{"syndrome": "x", "gene": 5}, {"syndrome": "x", "variant": ["a"]},
                                  {"syndrome": ["x"]}, {"syndrome": "x", "kind": ["clinical"]}])
def test_diagnosis_with_wrong_types_is_a_clear_400(web_server, token, body):
    auth = {"Authorization": f"Bearer {token}"}
    case_id = requests.post(f"{web_server}/api/v1/cases", json={"patient_ref": "PT-TYPES"}, headers=auth).json()["id"]
    r = requests.post(f"{web_server}/api/v1/cases/{case_id}/diagnosis", json=body, headers=auth)
    assert r.status_code == 400 and r.json()["error"]


def test_nul_characters_are_refused_not_500(web_server, token):
    """Found by schemathesis: PostgreSQL text cannot hold NUL."""
    auth = {"Authorization": f"Bearer {token}"}
    case_id = requests.post(f"{web_server}/api/v1/cases", json={"patient_ref": "PT-NUL"}, headers=auth).json()["id"]
    for body in ({"syndrome": "\x00x"}, {"syndrome": "x", "gene": "\x00"}):
        r = requests.post(f"{web_server}/api/v1/cases/{case_id}/diagnosis", json=body, headers=auth)
        assert r.status_code == 400 and "NUL" in r.json()["error"]
    r = requests.post(f"{web_server}/cases/{case_id}/images", headers={**auth, "Accept": "application/json"},
                      files={"photo": ("bad\x00name.jpg", b"not an image")})
    assert r.status_code == 400 and r.json()["error"] == "photo (file name) contains a NUL character"


def test_api_case_with_hpo_terms_and_a_catalogue_diagnosis(web_server, token):
    from tests.test_catalog import ensure_catalog

    ensure_catalog()
    auth = {"Authorization": f"Bearer {token}"}
    api = web_server + "/api/v1"
    r = requests.post(f"{api}/cases", json={"patient_ref": "PT-API-HPO", "ancestry": "Yoruba",
                                             "hpo_terms": ["HP:0000316", "HP:0000316", "HP:0000347"]}, headers=auth)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["ancestry"] == "Yoruba" and [t["id"] for t in body["hpo_terms"]] == ["HP:0000316", "HP:0000347"]
    for bad, message in (({"hpo_terms": ["HP:9999999", "HP:9999998"]}, "unknown HPO terms: HP:9999999, HP:9999998"),
                         ({"hpo_terms": "HP:0000316"}, "must be a list"), ({"hpo_terms": [5]}, "must be a list"),
                         ({"ancestry": "x" * 65}, "ancestry")):
        r = requests.post(f"{api}/cases", json={"patient_ref": "PT-API-BAD", **bad}, headers=auth)
        assert r.status_code == 400 and message in r.json()["error"], (bad, r.text)
    r = requests.post(f"{api}/cases/{body['id']}/diagnosis", headers=auth,
                      json={"syndrome": "OMIM:147920", "kind": "molecular", "gene": "KMT2D"})
    assert r.status_code == 200 and r.json()["syndrome"]["name"] == "Kabuki Syndrome 1"
    r = requests.post(f"{api}/cases/{body['id']}/diagnosis", headers=auth, json={"syndrome": "ORPHA:9999999"})
    assert r.status_code == 400 and "unknown syndrome" in r.json()["error"]
    spec = requests.get(f"{api}/openapi.json", headers=auth).json()
    assert {"/api/v1/hpo", "/api/v1/syndromes"} <= set(spec["paths"]) and "hpo_terms" in spec["components"]["schemas"][
        "NewCase"]["properties"]

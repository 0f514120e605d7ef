"""Every page and API needs login; clinicians see only their own cases; admins see all."""
from __future__ import annotations

import io

import requests
from PIL import Image
from skimage import data

from tests.conftest import Portal, new_user


def test_anonymous_is_sent_to_login(engines, web_server):
    for path in ("/", "/cases/new", "/cases/1"):
        r = requests.get(web_server + path, allow_redirects=False)
        assert r.status_code == 302 and r.headers["Location"].startswith("/login"), path
    r = requests.get(web_server + "/api/v1/cases/1")
    assert r.status_code == 401 and r.json()["error"] == "login required"


def test_wrong_password_is_refused(engines, web_server):
    portal = Portal(web_server)
    r = portal.login(new_user(), "not the password")
    assert r.status_code == 401
    assert requests.get(web_server + "/", cookies=portal.http.cookies, allow_redirects=False).status_code == 302


def test_login_form_needs_csrf(engines, web_server):
    r = requests.post(web_server + "/login", data={"email": new_user(), "password": "x" * 12})
    assert r.status_code == 400 and "CSRF" in r.text


def test_clinicians_are_isolated_and_admins_see_all(engines, web_server):
    alice, bob = Portal(web_server, new_user()), Portal(web_server, new_user())
    admin = Portal(web_server, new_user("admin"))
    case_id = alice.create_case("PT-ALICE")
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    assert alice.upload(case_id, [("a.png", buf.getvalue())]).status_code == 201
    image_id = alice.case(case_id)["images"][0]["id"]

    assert bob.http.get(f"{web_server}/cases/{case_id}").status_code == 404
    assert bob.http.get(f"{web_server}/api/v1/cases/{case_id}").status_code == 404
    assert bob.http.get(f"{web_server}/api/v1/images/{image_id}").status_code == 404
    assert "PT-ALICE" not in bob.http.get(web_server + "/").text
    token = bob.csrf("/")
    r = bob.http.post(f"{web_server}/cases/{case_id}/images", files={"photo": ("b.png", buf.getvalue())},
                      headers={"X-CSRFToken": token, "Accept": "application/json"})
    assert r.status_code == 404

    assert admin.http.get(f"{web_server}/cases/{case_id}").status_code == 200
    assert admin.case(case_id)["patient_ref"] == "PT-ALICE"
    assert "PT-ALICE" in admin.http.get(web_server + "/").text


def test_session_cookie_flags(engines, web_server):
    portal = Portal(web_server)
    r = portal.login(new_user())
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie


def test_patient_ref_must_be_pseudonymous(engines, web_server):
    portal = Portal(web_server, new_user())
    token = portal.csrf("/cases/new")
    r = portal.http.post(web_server + "/cases/new", data={"csrf_token": token, "patient_ref": "Jane Doe",
                                                          "sex": "female", "age_years": ""}, allow_redirects=False)
    assert r.status_code == 400 and "no names" in r.text


def test_audit_log_is_admin_only_and_records_views(engines, web_server):
    clinician_email = new_user()
    clinician = Portal(web_server, clinician_email)
    case_id = clinician.create_case("PT-AUDITED")
    assert clinician.http.get(f"{web_server}/cases/{case_id}").status_code == 200
    assert clinician.http.get(f"{web_server}/admin/audit").status_code == 403
    admin = Portal(web_server, new_user("admin"))
    page = admin.http.get(f"{web_server}/admin/audit", params={"user": clinician_email})
    assert page.status_code == 200
    for action in ("login", "case create", "case view"):
        assert f'<td class="nowrap">{action}</td>' in page.text
    assert "audit_view" in admin.http.get(f"{web_server}/admin/audit", params={"action": "audit_view"}).text


def test_cookies_are_secure_by_default(engines, monkeypatch):
    from shared.config import reload_settings
    from web import create_app

    monkeypatch.delenv("GESTALT_SECURE_COOKIES")
    try:
        reload_settings()
        app = create_app()
        assert app.config["SESSION_COOKIE_SECURE"] and app.config["REMEMBER_COOKIE_SECURE"]
    finally:
        monkeypatch.undo()
        reload_settings()

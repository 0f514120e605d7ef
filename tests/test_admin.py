"""The admin console over HTTP: admin-only, users, models, queues with retry/cancel; every route needs login."""
from __future__ import annotations

import re

import pytest
import torch
from sqlalchemy import select

from shared.db import session_scope
from shared.ml.members.casia import casia_only
from shared.ml.nets.ensemble import RegionalEnsemble
from shared.modelops import registry
from shared.models import Case, Image, ModelVersion
from shared.storage import get_storage
from tests.conftest import Portal, new_user

ADMIN_PAGES = ["/admin/", "/admin/users", "/admin/models", "/admin/audit"]


def _post(portal: Portal, path: str, **data):
    token = portal.csrf("/")
    return portal.http.post(portal.base + path, data={"csrf_token": token, **data}, allow_redirects=True)


def test_admin_pages_are_admin_only(engines, web_server):
    clinician = Portal(web_server, new_user())
    for path in ADMIN_PAGES:
        assert clinician.http.get(web_server + path).status_code == 403, path
    assert _post(clinician, "/admin/users", email="x@y.example", role="admin").status_code == 403
    admin = Portal(web_server, new_user("admin"))
    for path in ADMIN_PAGES:
        assert admin.http.get(web_server + path).status_code == 200, path


def test_user_management(engines, web_server):
    admin = Portal(web_server, new_user("admin"))
    email = f"made-by-admin-{id(admin)}@clinic.example"
    page = _post(admin, "/admin/users", email=email, role="clinician").text
    password = re.search(r"Temporary password \(shown once\): (\S+)<", page).group(1)
    assert Portal(web_server).login(email, password).status_code == 302
    with session_scope() as s:
        from shared.users import find_user

        user_id = find_user(s, email).id
    _post(admin, f"/admin/users/{user_id}", action="disable")
    assert Portal(web_server).login(email, password).status_code == 401
    _post(admin, f"/admin/users/{user_id}", action="enable")
    page = _post(admin, f"/admin/users/{user_id}", action="reset").text
    new_password = re.search(r"\(shown once\): (\S+)<", page).group(1)
    assert Portal(web_server).login(email, password).status_code == 401
    assert Portal(web_server).login(email, new_password).status_code == 302
    _post(admin, f"/admin/users/{user_id}", action="role", role="admin")
    promoted = Portal(web_server)
    assert promoted.login(email, new_password).headers["Location"].endswith("/account/password")
    assert promoted.http.get(web_server + "/admin/").url.endswith("/account/password")  # forced change first
    token = promoted.csrf("/account/password")
    chosen = "my own password 42"
    r = promoted.http.post(web_server + "/account/password", data={
        "csrf_token": token, "current": new_password, "new": chosen, "repeat": chosen}, allow_redirects=False)
    assert r.status_code == 302
    assert promoted.http.get(web_server + "/admin/").status_code == 200
    assert "user_disable" in admin.http.get(web_server + "/admin/audit", params={"action": "user_disable"}).text


def test_models_activate_and_roll_back(engines, web_server):
    torch.manual_seed(0)
    names = []
    with session_scope() as s:
        for i in range(2):
            model = RegionalEnsemble(("full_face",), 2, width=0.125)
            names.append(registry.register_model(s, get_storage(), casia_only(model, ["m-a", "m-b"]), {},
                                                 name=f"admin-model-{i}-{id(s)}").name)
        ids = [s.scalars(select(ModelVersion.id).where(ModelVersion.name == n)).one() for n in names]
    admin = Portal(web_server, new_user("admin"))
    assert names[0] in admin.http.get(web_server + "/admin/models").text
    _post(admin, f"/admin/models/{ids[0]}/activate")
    _post(admin, f"/admin/models/{ids[1]}/activate")
    with session_scope() as s:
        assert registry.active_version(s).id == ids[1]
    _post(admin, "/admin/models/rollback")
    with session_scope() as s:
        assert registry.active_version(s).id == ids[0]


def test_queues_page_and_failed_photo_retry_cancel(engines, web_server):
    clinician = Portal(web_server, new_user())
    case_id = clinician.create_case("PT-QUEUE")
    with session_scope() as s:
        case = s.get(Case, case_id)
        failed = [Image(case_id=case.id, sha256="f" * 64, object_key="originals/ff/missing.jpg",
                        content_type="image/jpeg", width=10, height=10, status="failed",
                        reason="internal error during align (ValueError)", stage_times={}) for _ in range(2)]
        s.add_all(failed)
        s.flush()
        retry_id, cancel_id = failed[0].id, failed[1].id
    admin = Portal(web_server, new_user("admin"))
    page = admin.http.get(web_server + "/admin/").text
    for section in ("Queue depth", "Last hour", "Stage latency", "Workers", "Failed photos"):
        assert section in page
    assert "internal error during align" in page and "<td>detect</td>" in page
    _post(admin, f"/admin/images/{cancel_id}/cancel")
    _post(admin, f"/admin/images/{retry_id}/retry")
    with session_scope() as s:
        assert s.get(Image, cancel_id).status == "rejected"
        assert "cancelled" in s.get(Image, cancel_id).reason
        assert s.get(Image, retry_id).status in ("queued", "detecting", "rejected")  # a worker may take it at once


@pytest.fixture(scope="module")
def app_client(engines):
    from web import create_app

    return create_app().test_client()


def test_every_route_needs_login(engines, app_client):
    app = app_client.application
    public = {"auth.login", "static", "healthz"}
    checked = 0
    for rule in app.url_map.iter_rules():
        if rule.endpoint in public:
            continue
        path = re.sub(r"<(?:int:)?[^>]+>", "1", rule.rule)
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            r = app_client.open(path, method=method)
            assert r.status_code in (302, 401), (method, path, r.status_code)
            checked += 1
    assert checked >= 20

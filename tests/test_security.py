"""API tokens, login rate limiting, presigned URLs, case deletion, retention and orphan collection."""
from __future__ import annotations

import io
import re
from datetime import UTC, datetime, timedelta

import pytest
import requests
from PIL import Image
from skimage import data
from sqlalchemy import func, select

from shared.db import session_scope
from shared.lifecycle import apply_retention, collect_orphans
from shared.models import AuditLog, Case
from shared.models import Image as ImageRow
from shared.storage import get_storage
from shared.users import create_token, find_user, revoke_token
from tests.conftest import Portal, new_user


def _png(rgb=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut() if rgb is None else rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_api_token_works_without_csrf_and_can_be_revoked(engines, web_server):
    email = new_user()
    case_id = Portal(web_server, email).create_case("PT-TOKEN")
    with session_scope() as s:
        token, secret = create_token(s, find_user(s, email), "script")
        token_id = token.id
    auth = {"Authorization": f"Bearer {secret}"}
    assert requests.get(f"{web_server}/api/v1/cases/{case_id}", headers=auth).json()["patient_ref"] == "PT-TOKEN"
    r = requests.post(f"{web_server}/cases/{case_id}/images", headers={**auth, "Accept": "application/json"},
                      files={"photo": ("a.png", _png())})
    assert r.status_code == 201, r.text
    assert requests.get(f"{web_server}/api/v1/cases/{case_id}",
                        headers={"Authorization": "Bearer gst_not-a-token"}).status_code == 401
    with session_scope() as s:
        revoke_token(s, token_id)
    assert requests.get(f"{web_server}/api/v1/cases/{case_id}", headers=auth).status_code == 401


def test_login_is_rate_limited_per_account(engines, web_server):
    email = new_user()
    portal = Portal(web_server)
    codes = [portal.login(email, "wrong password!").status_code for _ in range(11)]
    assert codes[:10] == [401] * 10 and codes[10] == 429
    assert Portal(web_server, new_user()).http.get(web_server + "/").status_code == 200  # others unaffected


def test_presigned_url_is_short_lived_and_scoped(engines, workers, web_server):
    portal = Portal(web_server, new_user())
    case_id = portal.create_case()
    portal.upload(case_id, [("a.png", _png())])
    image = portal.wait(case_id, settled=("done", "awaiting_model", "rejected", "failed"))["images"][0]
    r = portal.http.get(f"{web_server}/api/v1/images/{image['id']}/aligned")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["expires_in"] <= 300 and "X-Amz-Expires=300" in body["url"]
    got = requests.get(body["url"])
    assert got.status_code == 200 and got.content[:4] == b"\x89PNG"
    other = re.sub(r"/aligned-[0-9a-f]+\.png\?", "/crops.npz?", body["url"], count=1)  # the same face's crops
    assert other != body["url"] and requests.get(other).status_code == 403  # the signature covers one object only
    stranger = Portal(web_server, new_user())
    assert stranger.http.get(f"{web_server}/api/v1/images/{image['id']}/aligned").status_code == 404


def test_delete_case_removes_rows_and_objects_but_keeps_shared_photos(engines, workers, web_server):
    portal = Portal(web_server, new_user())
    rgb = data.astronaut().copy()
    rgb[0, 0] = (1, 2, 3)  # a photo no other test uploads
    photo = _png(rgb)
    keep_id, gone_id = portal.create_case("PT-KEEP"), portal.create_case("PT-GONE")
    portal.upload(keep_id, [("a.png", photo)])
    portal.upload(gone_id, [("a.png", photo)])
    rgb2 = rgb.copy()
    rgb2[0, 1] = (4, 5, 6)
    portal.upload(gone_id, [("b.png", _png(rgb2))])
    settled = ("done", "awaiting_model", "rejected", "failed")
    portal.wait(keep_id, settled=settled)
    portal.wait(gone_id, settled=settled)
    with session_scope() as s:
        shas = {i.id: i.sha256 for i in s.scalars(select(ImageRow).where(ImageRow.case_id == gone_id))}
    shared_sha, own_sha = sorted(shas.values(), key=lambda h: h != _sha_of_case(keep_id))
    storage = get_storage()
    assert any(own_sha in k for k in storage.list())
    # The deleted case's aligned faces, shown once: their PNGs (made on that first view) go with the case too.
    shown = [i["id"] for i in portal.case(gone_id)["images"] if i["face"]]
    assert shown and all(portal.http.get(f"{web_server}/images/{i}/aligned.png").status_code == 200 for i in shown)

    token = portal.csrf(f"/cases/{gone_id}")
    r = portal.http.post(f"{web_server}/cases/{gone_id}/delete", data={"csrf_token": token}, allow_redirects=False)
    assert r.status_code == 303
    assert portal.http.get(f"{web_server}/cases/{gone_id}").status_code == 404
    keys = storage.list()
    assert not any(own_sha in k for k in keys), "the deleted case's own photo and crops must be gone"
    assert any(shared_sha in k for k in keys), "a photo still used by another case must stay"
    with session_scope() as s:
        assert s.get(Case, gone_id) is None
        assert s.scalar(select(func.count()).select_from(ImageRow).where(ImageRow.case_id == gone_id)) == 0
        assert s.scalars(select(AuditLog).where(AuditLog.action == "case_delete",
                                                AuditLog.target_id == str(gone_id))).first() is not None
    assert portal.case(keep_id)["images"], "the other case is untouched"


def _sha_of_case(case_id: int) -> str:
    with session_scope() as s:
        return s.scalars(select(ImageRow.sha256).where(ImageRow.case_id == case_id)).first()


def test_retention_deletes_old_cases_only(engines, web_server):
    portal = Portal(web_server, new_user())
    old_id, new_id = portal.create_case("PT-OLD"), portal.create_case("PT-NEW")
    with session_scope() as s:
        s.get(Case, old_id).created_at = datetime.now(UTC) - timedelta(days=40)
    with session_scope() as s:
        deleted = apply_retention(s, get_storage(), days=30)
    assert deleted >= 1
    with session_scope() as s:
        assert s.get(Case, old_id) is None and s.get(Case, new_id) is not None
    with session_scope() as s:
        assert apply_retention(s, get_storage(), days=0) == 0


def test_orphan_objects_are_collected(engines):
    storage = get_storage()
    orphan = "originals/00/" + "0" * 64 + ".jpg"
    storage.put(orphan, b"x")
    before = set(storage.list())
    with session_scope() as s:
        referenced = set(s.scalars(select(ImageRow.object_key)))
        collect_orphans(s, storage, min_age=timedelta(0))
    keys = set(storage.list())
    assert orphan not in keys
    assert (before & referenced) <= keys, "objects that rows refer to must stay"


@pytest.mark.parametrize("path", ["/", "/cases/new", "/api/v1/cases/1", "/api/v1/images/1/aligned"])
def test_security_headers(engines, web_server, path):
    r = Portal(web_server, new_user()).http.get(web_server + path)
    assert r.headers["X-Frame-Options"] == "DENY" and "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["Cache-Control"] == "no-store"

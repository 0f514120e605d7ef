"""Bad uploads get a clear error, and leave no row and no object behind."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data
from sqlalchemy import func, select

from shared.db import session_scope
from shared.models import AuditLog
from shared.models import Image as ImageRow
from shared.storage import get_storage, original_key
from tests.conftest import Portal, new_user


def _jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _noise_png(side: int) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG", compress_level=0)
    return buf.getvalue()


BAD = {
    "text file named .jpg": (b"this is not a photo\n" * 10, 415, "not an image"),
    "truncated JPEG": (_jpeg(data.astronaut())[:4000], 400, "damaged or truncated"),
    "zero bytes": (b"", 400, "empty"),
    "over the size limit": (_noise_png(1000), 413, "limit"),  # ~3 MB, the tests' limit is 2 MB
    "PDF renamed .jpg": (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n", 415, "not an image"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_upload_is_refused_and_leaves_nothing(engines, web_server, name):
    content, status, words = BAD[name]
    portal = Portal(web_server, new_user())
    case_id = portal.create_case()
    storage = get_storage()
    objects_before = set(storage.list())
    with session_scope() as s:
        rows_before = s.scalar(select(func.count()).select_from(ImageRow))

    r = portal.upload(case_id, [("photo.jpg", content)])
    assert r.status_code == status, r.text
    assert words in r.json()["error"]

    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(ImageRow)) == rows_before
    assert set(storage.list()) == objects_before
    # The portal still serves.
    assert portal.case(case_id)["images"] == []


def test_one_bad_file_refuses_the_whole_request(engines, web_server):
    portal = Portal(web_server, new_user())
    case_id = portal.create_case()
    before = set(get_storage().list())
    r = portal.upload(case_id, [("good.jpg", _jpeg(data.astronaut())), ("bad.jpg", b"nope")])
    assert r.status_code == 415 and "bad.jpg" in r.json()["error"]
    assert portal.case(case_id)["images"] == []
    assert set(get_storage().list()) == before


def test_refusal_is_audited(engines, web_server):
    email = new_user()
    portal = Portal(web_server, email)
    case_id = portal.create_case()
    portal.upload(case_id, [("x.jpg", b"")])
    with session_scope() as s:
        actions = s.scalars(select(AuditLog.action).where(AuditLog.target_id == str(case_id))).all()
    assert "case_create" in actions and "upload_refused" in actions


def test_a_failed_insert_removes_its_own_original_but_not_one_another_photo_uses(engines, web_server):
    """Originals are put before their rows are written, a photo already stored included (the same bytes
    again). When the write fails, each object goes again unless another photo's row points at it."""
    from types import SimpleNamespace

    from sqlalchemy.exc import IntegrityError

    from web.uploads import store_images, validate_files

    rgb = data.astronaut().copy()
    rgb[0, 0] = (9, 8, 7)  # photos no other test uploads
    stored_already = _jpeg(rgb)
    rgb[0, 1] = (6, 5, 4)
    new_photo = _jpeg(rgb)
    portal = Portal(web_server, new_user())
    assert portal.upload(portal.create_case(), [("kept.jpg", stored_already)]).status_code == 201
    decoded = validate_files([("kept.jpg", stored_already), ("new.jpg", new_photo)])
    keys = [original_key(d.sha256, d.ext) for d in decoded]
    no_such_case = SimpleNamespace(id=2**31 - 1)  # the rows' foreign key fails
    with session_scope() as s, pytest.raises(IntegrityError):
        store_images(s, no_such_case, decoded, user_id=None, ip=None)
    storage = get_storage()
    assert storage.exists(keys[0]) and not storage.exists(keys[1])

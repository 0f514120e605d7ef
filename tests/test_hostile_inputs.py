"""Every broken or hostile file gets a clear 4xx or a `rejected` image with a reason; nothing is left behind."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests
from sqlalchemy import select

from shared.db import session_scope
from shared.models import Image as ImageRow
from shared.storage import get_storage
from tests.conftest import Portal, new_user
from tests.hostile_corpus import corpus

pytestmark = pytest.mark.e2e
FINAL = ("done", "awaiting_model", "rejected")


def test_hostile_corpus(engines, workers, web_server):
    files = corpus()
    assert len(files) >= 40
    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-HOSTILE")
    refused, accepted = {}, {}
    for name, content in files.items():
        r = portal.upload(case_id, [(name, content)])
        assert r.status_code in (201, 400, 413, 415), (name, r.status_code, r.text[:300])
        if r.status_code == 201:
            accepted[r.json()["images"][0]["id"]] = name
        else:
            message = r.json()["error"]
            assert name in message and len(message) > len(name) + 10, message
            refused[name] = r.status_code

    payload = portal.wait(case_id, timeout=300, settled=(*FINAL, "failed"))
    statuses = {}
    for image in payload["images"]:
        name = accepted[image["id"]]
        statuses[name] = image["status"]
        assert image["status"] in FINAL, (name, image)
        if image["status"] == "rejected":
            assert image["reason"], name
    assert statuses["no-face.jpg"] == "rejected"
    print(f"\nhostile corpus: {len(files)} files, {len(refused)} refused at upload "
          f"({sorted(set(refused.values()))}), {len(accepted)} accepted -> {sorted(statuses.items())}")

    assert workers.running, "a hostile file must not kill the worker"
    assert requests.get(web_server + "/healthz").ok
    # No orphan object and no row without its object.
    keys = set(get_storage().list("originals/"))
    with session_scope() as s:
        ours = set(s.scalars(select(ImageRow.object_key).where(ImageRow.case_id == case_id)))
        referenced = set(s.scalars(select(ImageRow.object_key)))
    assert ours <= keys, "every accepted photo is stored"
    assert keys <= referenced, f"orphan originals: {sorted(keys - referenced)[:5]}"


def test_fuzz_decode_and_validate():
    """A bounded atheris run over the upload gate (decode_upload)."""
    script = Path(__file__).with_name("fuzz_decode.py")
    r = subprocess.run([sys.executable, str(script), "-runs=3000", "-max_total_time=60", "-rss_limit_mb=4096"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Done" in r.stderr or "DONE" in r.stderr, r.stderr[-2000:]

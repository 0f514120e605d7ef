"""Seeding the gallery from a clinic's photo archive: `gestalt import photos DIR`, the API and the admin console.

Real photos (faces/people grouped by identity into patients, faces/orl identities), real PostgreSQL, SeaweedFS and
Redis, the portal under gunicorn. Every import is all or nothing and idempotent; every refusal writes nothing."""
from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import redis
import requests
from click.testing import CliRunner
from sqlalchemy import delete, func, select

from shared.config import get_settings
from shared.db import session_scope
from shared.models import AuditLog, Case, Diagnosis, Image, Syndrome, User
from shared.storage import get_storage
from shared.users import create_token, find_user
from tests.conftest import Portal, new_user, run_cli, shared_data
from tests.test_catalog import ensure_catalog
from tests.test_hardening import app  # noqa: F401 - the in-process portal fixture

PEOPLE = {"people-a": {"PT-W1": ["img5.jpg", "img10.jpg", "img11.jpg"], "PT-W2": ["img16.jpg", "img17.jpg"]},
          "people-b": {"PT-N1": ["img20.jpg", "img21.jpg"]}}
ORL = {"OMIM:147920": {"ORL-1": "s1", "ORL-2": "s2"}, "OMIM_194050": {"ORL-3": "s3"}}
LABELS = "folder,syndrome\npeople-a,Williams syndrome\npeople-b,ORPHA:648\n"
EXPECTED = {"PT-W1": ("ORPHA:904", 3), "PT-W2": ("ORPHA:904", 2), "PT-N1": ("ORPHA:648", 2),
            "ORL-1": ("OMIM:147920", 2), "ORL-2": ("OMIM:147920", 2), "ORL-3": ("OMIM:194050", 2)}


@pytest.fixture(scope="module")
def gallery(engines, tmp_path_factory):
    """DIR/<syndrome>/<patient>/<photo> from the shared faces, the labels file beside it; the cases the module's
    imports create are deleted afterwards (they are consented and diagnosed: no retraining may find them)."""
    ensure_catalog()
    people, orl = shared_data("faces", "people"), shared_data("faces", "orl")
    root = tmp_path_factory.mktemp("archive")
    folder = root / "gallery"
    for syndrome, patients in PEOPLE.items():
        for patient, photos in patients.items():
            (folder / syndrome / patient).mkdir(parents=True)
            for photo in photos:
                shutil.copy(people / photo, folder / syndrome / patient / photo)
    for syndrome, patients in ORL.items():
        for patient, subject in patients.items():
            (folder / syndrome / patient).mkdir(parents=True)
            for n in (1, 2):
                shutil.copy(orl / subject / f"{n}.pgm", folder / syndrome / patient / f"{n}.pgm")
    (folder / ".DS_Store").write_bytes(b"\0" * 64)  # what a Mac leaves: skipped, not refused
    (root / "labels.csv").write_text(LABELS)
    owners: list[str] = []
    yield folder, root / "labels.csv", owners
    with session_scope() as s:
        ids = [find_user(s, email).id for email in owners]
        s.execute(delete(Case).where(Case.owner_id.in_(ids), Case.external_id.like("photos-%")))


def _owner(owners: list[str], role: str = "clinician") -> str:
    email = new_user(role)
    owners.append(email)
    return email


def _cases(email: str) -> list[Case]:
    with session_scope() as s:
        cases = s.scalars(select(Case).where(Case.owner_id == find_user(s, email).id).order_by(Case.id)).all()
        for c in cases:  # loaded while the session is open
            _ = (c.images, c.diagnosis and s.get(Syndrome, c.diagnosis.syndrome_id))
        s.expunge_all()
        return cases


def _codes(email: str) -> dict[str, tuple[str, int]]:
    with session_scope() as s:
        rows = s.execute(select(Case.patient_ref, Syndrome.omim, Syndrome.orpha, func.count(Image.id))
                         .join(Diagnosis, Diagnosis.case_id == Case.id)
                         .join(Syndrome, Syndrome.id == Diagnosis.syndrome_id)
                         .outerjoin(Image, Image.case_id == Case.id)
                         .where(Case.owner_id == find_user(s, email).id)
                         .group_by(Case.patient_ref, Syndrome.omim, Syndrome.orpha)).all()
    return {ref: (orpha if ref.startswith("PT-") else omim, n) for ref, omim, orpha, n in rows}


def _queued(image_ids: list[int]) -> set[int]:
    """The images whose detect message is in the broker, delivered to a worker that has not acknowledged it yet
    (kombu's ``unacked`` hash: a worker prefetches before its batch claims the photo), or which a worker has
    already taken."""
    client = redis.Redis.from_url(get_settings().redis_url)
    waiting = set()
    delivered = [json.loads(raw)[0] for raw in client.hvals("unacked")]
    for message in [json.loads(raw) for raw in client.lrange("detect", 0, -1)] + delivered:
        if message["headers"]["task"] == "pipeline.detect":
            waiting.add(int(message["headers"]["argsrepr"].strip("(),")))
    with session_scope() as s:
        taken = set(s.scalars(select(Image.id).where(Image.id.in_(image_ids), Image.status != "queued")))
    return {i for i in image_ids if i in waiting or i in taken}


def _audits(action: str, **detail) -> list[AuditLog]:
    with session_scope() as s:
        rows = s.scalars(select(AuditLog).where(AuditLog.action == action)).all()
        s.expunge_all()
    return [r for r in rows if all(r.detail.get(k) == v for k, v in detail.items())]


# ------------------------------------------------------------------------------------------------ the command
def test_cli_imports_every_patient_once(engines, gallery):
    folder, labels, owners = gallery
    owner = _owner(owners)
    r = run_cli(engines, "import", "photos", str(folder), "--owner", owner, "--consent", "yes",
                "--labels", str(labels), timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "6 case(s) and 13 photo(s) imported; 0 patient(s) were imported before" in r.stderr, r.stderr
    assert "skipped 1 system file(s): .DS_Store" in r.stderr
    assert _codes(owner) == EXPECTED
    cases = _cases(owner)
    with session_scope() as s:
        owner_id = find_user(s, owner).id
    assert {c.external_id for c in cases} == {f"photos-{ref}" for ref in EXPECTED}
    assert all(c.diagnosis.consent and c.diagnosis.kind == "clinical" and c.diagnosis.diagnosed_by == owner_id
               for c in cases)
    images = [i for c in cases for i in c.images]
    assert all(get_storage().exists(i.object_key) for i in images)
    assert {i.content_type for i in images} == {"image/jpeg", "image/png"}  # the PGMs are stored as PNG
    assert _queued([i.id for i in images]) == {i.id for i in images}
    audited = {int(a.target_id) for a in _audits("case_import", via="photo-folder", owner=owner_id)}
    assert audited == {c.id for c in cases}

    from shared.cli import main

    again = CliRunner().invoke(main, ["import", "photos", str(folder), "--owner", owner, "--consent", "yes",
                                      "--labels", str(labels)], terminal_width=200)
    assert again.exit_code == 0, again.output
    assert "0 case(s) and 0 photo(s) imported; 6 patient(s) were imported before and skipped" in again.output
    assert [c.id for c in _cases(owner)] == [c.id for c in cases]


def _broken_copy(folder: Path, where: Path) -> tuple[Path, bytes]:
    """The gallery with one of each problem the import must name; returns it and a fresh photo's bytes."""
    broken = where / "broken"
    shutil.copytree(folder, broken)
    (broken / "Not a syndrome" / "PT-X1").mkdir(parents=True)
    shutil.copy(folder / "people-b" / "PT-N1" / "img20.jpg", broken / "Not a syndrome" / "PT-X1" / "a.jpg")
    (broken / "people-a" / "Jane Doe").mkdir()
    shutil.copy(folder / "people-a" / "PT-W1" / "img5.jpg", broken / "people-a" / "Jane Doe" / "a.jpg")
    data = (folder / "people-a" / "PT-W1" / "img10.jpg").read_bytes()
    (broken / "people-a" / "PT-W2" / "cut.jpg").write_bytes(data[: len(data) // 3])  # a truncated JPEG
    outside = where / "outside.jpg"
    shutil.copy(folder / "people-a" / "PT-W1" / "img11.jpg", outside)
    (broken / "people-b" / "PT-N1" / "linked.jpg").symlink_to(outside)
    (broken / "notes.txt").write_text("a stray file beside the syndrome folders")
    shutil.copy(folder / "people-a" / "PT-W1" / "img5.jpg", broken / "people-b" / "loose.jpg")
    (broken / "OMIM:147920" / "ORL-1" / "extra").mkdir()
    from PIL import Image as PILImage

    fresh = io.BytesIO()
    PILImage.open(folder / "people-a" / "PT-W1" / "img5.jpg").rotate(7).save(fresh, format="JPEG", quality=80)
    (broken / "OMIM:147920" / "ORL-3").mkdir()
    (broken / "OMIM:147920" / "ORL-3" / "fresh.jpg").write_bytes(fresh.getvalue())
    return broken, fresh.getvalue()


def test_cli_refuses_every_problem_and_writes_nothing(gallery, tmp_path):
    from shared.cli import main
    from shared.ml.preprocess.imaging import decode_upload

    folder, labels, owners = gallery
    broken, fresh = _broken_copy(folder, tmp_path)
    (tmp_path / "labels.csv").write_text(LABELS + "people-c,OMIM:999999\n")
    owner = _owner(owners)
    r = CliRunner().invoke(main, ["import", "photos", str(broken), "--owner", owner, "--consent", "yes",
                                  "--labels", str(tmp_path / "labels.csv")])
    assert r.exit_code == 1, r.output
    expected = [
        "labels.csv line 4: unknown syndrome 'OMIM:999999': not a catalogue name or an OMIM/ORPHA id",
        "Not a syndrome/: not a catalogue name or an OMIM/ORPHA id (such as OMIM:147920 or ORPHA:2322), and the "
        "labels file does not map it",
        "people-a/Jane Doe/: a patient folder's name must be 1-64 letters, digits, '.', '_' or '-' (a pseudonymous "
        "reference, never a name)",
        "people-a/PT-W2/cut.jpg: the image file is damaged or truncated",
        "people-b/PT-N1/linked.jpg: a link to a place outside the import folder; copy the photo in",
        "notes.txt: a file beside the syndrome folders; photos go in <syndrome>/<patient>/",
        "people-b/loose.jpg: a file directly in a syndrome folder; put each patient's photos in a folder of their own",
        "OMIM:147920/ORL-1/extra/: a folder inside a patient folder; photos go directly in <syndrome>/<patient>/",
        "OMIM_194050/ORL-3/: patient ORL-3 is also in OMIM:147920/ORL-3/; a patient has one diagnosis",
    ]
    output = " ".join(r.output.split())  # rich wraps long lines
    for line in expected:
        assert line in output, (line, r.output)
    assert output.startswith("Error: nothing was imported:")
    assert len([ln for ln in r.output.splitlines() if ln.startswith("  ")]) >= len(expected)
    assert _cases(owner) == []
    with session_scope() as s:
        owner_id = find_user(s, owner).id
    assert _audits("case_import", owner=owner_id) == []
    key = decode_upload(fresh, max_bytes=10**7, max_pixels=1e8, min_side=64)
    assert not get_storage().exists(f"originals/{key.sha256}.{key.ext}")


@pytest.mark.parametrize("consent", [None, "no"])
def test_cli_without_consent_imports_nothing(gallery, consent):
    from shared.cli import main

    folder, labels, owners = gallery
    owner = _owner(owners)
    args = ["import", "photos", str(folder), "--owner", owner, "--labels", str(labels)]
    r = CliRunner().invoke(main, args + (["--consent", consent] if consent else []))
    assert r.exit_code == 2, r.output
    assert "nothing was imported: the gallery holds only photos of patients who consented to their reuse" in \
        " ".join(r.output.split())
    assert _cases(owner) == []


def test_a_failed_write_leaves_no_object(gallery, tmp_path):
    """The transaction fails (an owner that does not exist): the photos stored on the way are removed again."""
    from shared.imports import write_cases
    from shared.photo_import import plan_photo_folder

    folder, labels, _ = gallery
    broken, fresh = _broken_copy(folder, tmp_path)
    only = tmp_path / "only"
    (only / "OMIM:147920" / "ORL-9").mkdir(parents=True)
    shutil.copy(broken / "OMIM:147920" / "ORL-3" / "fresh.jpg", only / "OMIM:147920" / "ORL-9" / "fresh.jpg")
    with session_scope() as s:
        plan = plan_photo_folder(s, only, consent=True)
        key = plan.cases[0].photos[0].key
        missing_owner = (s.scalar(select(func.max(User.id))) or 0) + 1000
        with pytest.raises(Exception, match="foreign key"):
            write_cases(s, get_storage(), plan.cases, missing_owner, via="test")
    assert not get_storage().exists(key)


# ------------------------------------------------------------------------------------------------ API and console
def _zip(folder: Path, wrap: str | None = "gallery", extra: list[tuple[zipfile.ZipInfo | str, bytes]] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                rel = path.relative_to(folder).as_posix()
                z.writestr(f"{wrap}/{rel}" if wrap else rel, path.read_bytes())
        for info, data in extra:
            z.writestr(info, data)
    return buf.getvalue()


def _token(email: str) -> dict:
    with session_scope() as s:
        _, secret = create_token(s, find_user(s, email), "import")
    return {"Authorization": f"Bearer {secret}"}


def _post(base: str, headers: dict, archive: bytes, owner: str, labels: str | None = LABELS, **fields):
    files = {"archive": ("gallery.zip", archive, "application/zip")}
    if labels is not None:
        files["labels"] = ("labels.csv", labels.encode(), "text/csv")
    return requests.post(f"{base}/api/v1/admin/imports/photos", headers=headers, files=files,
                         data={"owner": owner, "consent": "yes", **fields}, timeout=120)


def test_api_imports_an_archive_once(gallery, web_server):
    folder, _, owners = gallery
    admin, owner = _owner(owners, "admin"), _owner(owners)
    archive = _zip(folder)
    r = _post(web_server, _token(admin), archive, owner, kind="molecular")
    assert r.status_code == 201, r.text
    body = r.json()
    assert {c["patient_ref"]: c["photos"] for c in body["cases"]} == {k: v[1] for k, v in EXPECTED.items()}
    assert {c["syndrome"] for c in body["cases"]} == {"Williams syndrome", "Noonan syndrome", "Kabuki Syndrome 1",
                                                      "Williams-Beuren syndrome"}
    assert body["photos"] == 13 and body["skipped"] == []
    assert _codes(owner) == EXPECTED
    cases = _cases(owner)
    assert all(c.diagnosis.kind == "molecular" and c.diagnosis.consent for c in cases)
    images = [i.id for c in cases for i in c.images]
    assert _queued(images) == set(images)
    with session_scope() as s:
        admin_id, owner_id = find_user(s, admin).id, find_user(s, owner).id
    assert {int(a.target_id) for a in _audits("case_import", via="archive", owner=owner_id)
            if a.user_id == admin_id} == {c["id"] for c in body["cases"]}
    assert len(_audits("photo_import", owner=owner_id)) == 1

    again = _post(web_server, _token(admin), archive, owner)
    assert again.status_code == 200 and again.json()["cases"] == [] and len(again.json()["skipped"]) == 6
    clinician = _owner(owners)
    refused = _post(web_server, _token(clinician), archive, clinician)
    assert refused.status_code == 403 and _cases(clinician) == []


@pytest.mark.parametrize("entry, problem", [
    ("../escape.jpg", "../escape.jpg: a '..' part would unpack outside the archive's folder"),
    ("/etc/cron.d/x", "/etc/cron.d/x: an absolute path"),
    ("link", "link: a symbolic link"),
    ("bomb.jpg", "times; no photo compresses more than 100 times (GESTALT_IMPORT_MAX_RATIO): a zip bomb?"),
])
def test_api_refuses_an_unsafe_archive_before_unpacking(gallery, web_server, entry, problem):
    folder, _, owners = gallery
    admin, owner = _owner(owners, "admin"), _owner(owners)
    info = zipfile.ZipInfo(entry)
    data = b"photos/elsewhere" if entry == "link" else b"x" * 100
    if entry == "link":
        info.external_attr = 0o120777 << 16
    if entry == "bomb.jpg":
        info.compress_type, data = zipfile.ZIP_DEFLATED, b"\0" * (1 << 20)
    r = _post(web_server, _token(admin), _zip(folder, extra=[(info, data)]), owner)
    assert r.status_code == 400, r.text
    assert problem in "\n".join(r.json()["problems"]), r.json()
    assert _cases(owner) == []
    with session_scope() as s:
        assert len(_audits("photo_import_refused", owner=find_user(s, owner).id)) == 1


def test_archive_checks_come_before_any_byte_is_unpacked(tmp_path):
    from shared.archives import ArchiveLimits, unpack_archive
    from shared.imports import ImportRefused

    limits = ArchiveLimits(max_entries=3, max_total_bytes=1 << 20, max_entry_bytes=1 << 19, max_ratio=100)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("a/b/c.jpg", b"\xff" * 10)
        z.writestr("a/b/../../../d.jpg", b"\xff" * 10)
        z.writestr("a/b/e.bin", b"\0" * (600 << 10))
    with pytest.raises(ImportRefused) as refused:
        unpack_archive(io.BytesIO(buf.getvalue()), tmp_path, limits)
    assert any("a '..' part" in p for p in refused.value.problems)
    assert any("unpacks to 0.6 MB; an entry may hold at most 0.5 MB" in p for p in refused.value.problems)
    assert list(tmp_path.iterdir()) == []
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as z:
        for i in range(4):
            z.writestr(f"s/p/{i}.jpg", b"x")
    with pytest.raises(ImportRefused, match="holds 4 entries; at most 3"):
        unpack_archive(io.BytesIO(many.getvalue()), tmp_path, limits)
    with pytest.raises(ImportRefused, match="not a zip archive"):
        unpack_archive(io.BytesIO(b"PK\x03\x04 not really"), tmp_path, limits)
    assert list(tmp_path.iterdir()) == []


def test_admin_console_imports_with_csrf(gallery, web_server):
    folder, _, owners = gallery
    admin, owner = Portal(web_server, _owner(owners, "admin")), _owner(owners)
    page = admin.http.get(f"{web_server}/admin/imports")
    assert page.status_code == 200 and 'enctype="multipart/form-data"' in page.text
    token = admin.csrf("/admin/imports")
    files = {"archive": ("gallery.zip", _zip(folder, wrap=None), "application/zip"),
             "labels": ("labels.csv", LABELS.encode(), "text/csv")}
    data = {"owner": owner, "consent": "yes", "kind": "clinical"}
    forged = admin.http.post(f"{web_server}/admin/imports", files=files, data=data)
    assert forged.status_code == 400 and "CSRF" in forged.text and _cases(owner) == []
    done = admin.http.post(f"{web_server}/admin/imports", files=files, data={**data, "csrf_token": token})
    assert done.status_code == 201, done.text
    assert "6 case(s) and 13 photo(s) imported" in done.text and "Williams-Beuren syndrome" in done.text
    assert _codes(owner) == EXPECTED
    unconsented = admin.http.post(f"{web_server}/admin/imports", files=files,
                                  data={"owner": owner, "csrf_token": token})
    assert unconsented.status_code == 400 and "consented to their reuse" in unconsented.text
    unsafe = admin.http.post(f"{web_server}/admin/imports", data={**data, "csrf_token": token}, files={
        **files, "archive": ("x.zip", _zip(folder, extra=[("../escape.jpg", b"x")]), "application/zip")})
    assert unsafe.status_code == 400 and "would unpack outside the archive" in unsafe.text
    clinician = Portal(web_server, _owner(owners))
    assert clinician.http.get(f"{web_server}/admin/imports").status_code == 403
    token = clinician.csrf("/")
    assert clinician.http.post(f"{web_server}/admin/imports", files=files,
                               data={**data, "csrf_token": token}).status_code == 403


def test_imports_are_rate_limited_and_only_an_admin_may_send_an_archive_this_large(app, gallery, monkeypatch):  # noqa: F811
    from shared.config import reload_settings
    from web.limits import limiter

    _, _, owners = gallery
    monkeypatch.setenv("GESTALT_IMPORT_RATE_LIMIT", "2 per minute")
    monkeypatch.setenv("GESTALT_IMPORT_MAX_ARCHIVE_MB", "5")  # above the 3 MB a photo upload may be here
    reload_settings()
    limiter.reset()
    try:
        admin, clinician = _owner(owners, "admin"), _owner(owners)
        client = app.test_client()

        def post(email: str, size: int):
            body = {"archive": (io.BytesIO(b"\0" * size), "big.zip"), "owner": email, "consent": "yes"}
            return client.post("/api/v1/admin/imports/photos", headers=_token(email), data=body,
                               content_type="multipart/form-data")

        too_large = post(admin, 7 << 20)
        assert too_large.status_code == 413 and "the archive is larger than the 5 MB limit" in too_large.json["error"]
        not_zip = post(admin, 4 << 20)  # larger than a photo upload, smaller than an archive: read, and refused
        assert not_zip.status_code == 400 and "not a zip archive" in not_zip.json["problems"][0]
        assert post(admin, 10).status_code == 400  # not a zip either: refused imports count...
        limited = post(admin, 10)  # ...and this is the third in a minute (the 413 never reached the import)
        assert limited.status_code == 429 and "too many archive imports" in limited.json["error"]
        clinicians = post(clinician, 4 << 20)
        assert clinicians.status_code == 413 and "the upload is larger than the 2 MB limit" in clinicians.json["error"]
        assert post(clinician, 10).status_code == 403
    finally:
        limiter.reset()
        monkeypatch.undo()
        reload_settings()

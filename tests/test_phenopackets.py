"""GA4GH Phenopackets v2: export from the CLI, the API and the portal; import all-or-nothing and idempotent;
a round trip reproduces a case field by field."""
from __future__ import annotations

import io
import json

import phenopackets as pp
import pytest
from click.testing import CliRunner
from google.protobuf import json_format
from PIL import Image as PILImage
from skimage import data
from sqlalchemy import delete, func, select

from shared.db import session_scope
from shared.models import Case, Face, Image, Syndrome
from shared.phenopackets import age_years, iso_age
from shared.storage import get_storage, original_key
from shared.users import find_user
from tests.conftest import new_user
from tests.test_catalog import ensure_catalog


@pytest.fixture(scope="module")
def case_id(engines):
    """A case with everything a packet carries: terms, ancestry, age, a molecular diagnosis with consent, a photo
    with measurements."""
    ensure_catalog()
    buf = io.BytesIO()
    PILImage.fromarray(data.astronaut()).save(buf, format="JPEG", quality=92)
    photo = buf.getvalue()
    from shared.ml.preprocess.imaging import decode_upload

    decoded = decode_upload(photo, max_bytes=10**7, max_pixels=1e8, min_side=64)
    get_storage().put(original_key(decoded.sha256, decoded.ext), decoded.data, decoded.content_type)
    with session_scope() as s:
        owner = find_user(s, new_user())
        kabuki = s.scalars(select(Syndrome).where(Syndrome.omim == "OMIM:147920")).one()
        from shared.models import Diagnosis

        case = Case(owner_id=owner.id, patient_ref="PT-PP-1", sex="female", age_years=6.5, ancestry="Yoruba",
                    hpo_terms=["HP:0000316", "HP:0000494"])
        s.add(case)
        s.flush()
        case.diagnosis = Diagnosis(case_id=case.id, syndrome_id=kabuki.id, kind="molecular", gene="KMT2D",
                                   variant="NM_003482.4:c.5263C>T", consent=True, diagnosed_by=owner.id)
        image = Image(case_id=case.id, sha256=decoded.sha256, object_key=original_key(decoded.sha256, decoded.ext),
                      content_type=decoded.content_type, width=decoded.width, height=decoded.height, status="done")
        s.add(image)
        s.flush()
        s.add(Face(image_id=image.id, box=[0, 0, 10, 10], confidence=1.0, detector="test",
                   measurements={"canthal_index": 38.5, "palpebral_fissure_slant": 4.2}))
        case_id = case.id
    yield case_id
    # The original and its imported copies carry a consented diagnosis: nightly retraining must not find them.
    with session_scope() as s:
        s.execute(delete(Case).where(Case.patient_ref.in_(["PT-PP-1"])))


def _fields(case: Case) -> dict:
    d = case.diagnosis
    return {"patient_ref": case.patient_ref, "sex": case.sex, "age_years": case.age_years, "ancestry": case.ancestry,
            "hpo_terms": list(case.hpo_terms), "photos": sorted(i.sha256 for i in case.images),
            "diagnosis": (d.syndrome_id, d.kind, d.gene, d.variant, d.consent) if d else None}


def test_ages_survive_the_iso_duration():
    for years in (0.0, 0.25, 6.5, 6.1, 17.0, 4.75):
        assert age_years(iso_age(years)) == pytest.approx(years, abs=1e-6)
    assert iso_age(6.5) == "P6Y6M" and age_years("P2Y3M2W") == pytest.approx(2.25 + 14 / 365.25, abs=1e-6)


def test_export_import_round_trip_reproduces_the_case(engines, case_id, tmp_path):
    from shared.cli import main

    runner = CliRunner()
    out = tmp_path / "packets"
    r = runner.invoke(main, ["export", "phenopackets", "--out", str(out), "--case", str(case_id)])
    assert r.exit_code == 0, r.output
    packet_file = out / f"gestalt-case-{case_id}.json"
    packet = json_format.Parse(packet_file.read_text(), pp.Phenopacket(), ignore_unknown_fields=False)
    assert packet.subject.id == "PT-PP-1" and packet.subject.sex == pp.FEMALE
    assert packet.subject.time_at_last_encounter.age.iso8601duration == "P6Y6M"
    assert [f.type.id for f in packet.phenotypic_features] == ["HP:0000316", "HP:0000494"]
    assert packet.phenotypic_features[0].type.label == "Hypertelorism"
    diagnosis = packet.interpretations[0].diagnosis
    assert diagnosis.disease.id == "OMIM:147920"
    variant = diagnosis.genomic_interpretations[0].variant_interpretation.variation_descriptor
    assert variant.gene_context.symbol == "KMT2D" and variant.gene_context.value_id.startswith("NCBIGene:")
    assert variant.expressions[0].value == "NM_003482.4:c.5263C>T"
    assert {m.assay.id for m in packet.measurements} == {"gestalt:canthal_index", "gestalt:palpebral_fissure_slant"}
    assert packet.files[0].uri.startswith("photos/") and (out / packet.files[0].uri).is_file()
    assert packet.meta_data.phenopacket_schema_version == "2.0"

    other = new_user()
    r = runner.invoke(main, ["import", "phenopackets", str(out), "--owner", other])
    assert r.exit_code == 0, r.output
    with session_scope() as s:
        original = s.get(Case, case_id)
        copy = s.scalars(select(Case).where(Case.owner_id == find_user(s, other).id)).one()
        assert copy.id != case_id and copy.external_id == f"gestalt-case-{case_id}"
        assert _fields(copy) == _fields(original)
    again = runner.invoke(main, ["import", "phenopackets", str(out), "--owner", other])
    assert again.exit_code == 0 and "1 packet(s) were imported before" in again.output
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Case).where(
            Case.owner_id == find_user(s, other).id)) == 1


def test_import_refuses_every_problem_and_imports_nothing(engines, case_id, tmp_path):
    from shared.cli import main

    runner = CliRunner()
    folder = tmp_path / "mixed"
    assert runner.invoke(main, ["export", "phenopackets", "--out", str(folder), "--case", str(case_id)]).exit_code == 0
    good = json.loads((folder / f"gestalt-case-{case_id}.json").read_text())
    good["id"] = "fresh-packet"
    (folder / "fresh.json").write_text(json.dumps(good))
    bad = json.loads(json.dumps(good))
    bad["id"] = "bad-packet"
    bad["subject"]["id"] = "Jane Doe"
    bad["phenotypicFeatures"].append({"type": {"id": "HP:9999999", "label": "no such term"}})
    bad["files"] = [{"uri": "../etc/passwd"}, {"uri": "photos/missing.jpg"}]
    bad["interpretations"][0]["diagnosis"]["disease"] = {"id": "OMIM:999999", "label": "Not a syndrome"}
    (folder / "bad.json").write_text(json.dumps(bad))
    (folder / "unknown-field.json").write_text(json.dumps({**good, "id": "x", "favouriteColour": "blue"}))
    (folder / "broken.json").write_text("{not json")
    owner = new_user()
    r = runner.invoke(main, ["import", "phenopackets", str(folder), "--owner", owner])
    assert r.exit_code != 0
    for line in ("bad.json: subject id 'Jane Doe'", "bad.json: unknown HPO terms: HP:9999999",
                 "bad.json: file '../etc/passwd': only paths relative", "bad.json: file photos/missing.jpg: not found",
                 "bad.json: unknown syndrome 'OMIM:999999'", "unknown-field.json: not a valid Phenopacket v2",
                 "broken.json: not a valid Phenopacket v2"):
        assert line in r.output, (line, r.output)
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Case).where(Case.owner_id == find_user(s, owner).id)) == 0


def test_api_and_portal_export_valid_packets(engines, web_server, case_id):
    import requests

    from shared.users import create_token
    from tests.conftest import PASSWORD, Portal

    with session_scope() as s:
        owner = s.get(Case, case_id).owner_id
        from shared.models import User

        email = s.get(User, owner).email
        _, secret = create_token(s, s.get(User, owner), "export")
    r = requests.get(f"{web_server}/api/v1/cases/{case_id}/phenopacket", headers={"Authorization": f"Bearer {secret}"})
    assert r.status_code == 200, r.text
    assert json_format.Parse(r.text, pp.Phenopacket(), ignore_unknown_fields=False).subject.id == "PT-PP-1"
    portal = Portal(web_server)
    portal.login(email, PASSWORD)
    r = portal.http.get(f"{web_server}/cases/{case_id}/phenopacket.json")
    assert r.status_code == 200 and "attachment" in r.headers["Content-Disposition"]
    json_format.Parse(r.text, pp.Phenopacket(), ignore_unknown_fields=False)
    stranger = Portal(web_server, new_user())
    assert stranger.http.get(f"{web_server}/cases/{case_id}/phenopacket.json").status_code == 404
    with session_scope() as s:
        from shared.models import AuditLog

        assert s.scalar(select(func.count()).select_from(AuditLog).where(
            AuditLog.action == "phenopacket_export", AuditLog.target_id == str(case_id))) >= 2


# ----------------------------------------------------------------------------------------- paths stay inside
def _exported(case_id: int, folder) -> dict:
    from shared.cli import main

    r = CliRunner().invoke(main, ["export", "phenopackets", "--out", str(folder), "--case", str(case_id)])
    assert r.exit_code == 0, r.output
    return json.loads((folder / f"gestalt-case-{case_id}.json").read_text())


@pytest.mark.parametrize("packet_id", ["../../../../tmp/gestalt-escape", "/tmp/gestalt-escape", "a/b", ".hidden",
                                       "x" * 129, "tab\tid"])
def test_import_refuses_packet_ids_that_are_not_plain_names(engines, case_id, tmp_path, packet_id):
    from shared.cli import main

    folder = tmp_path / "in"
    packet = _exported(case_id, folder)
    (folder / f"gestalt-case-{case_id}.json").unlink()
    (folder / "evil.json").write_text(json.dumps({**packet, "id": packet_id}))
    owner = new_user()
    r = CliRunner().invoke(main, ["import", "phenopackets", str(folder), "--owner", owner])
    assert r.exit_code != 0
    assert f"evil.json: packet id {packet_id[:80]!r} must be 1-128 letters, digits" in r.output, r.output
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Case).where(Case.owner_id == find_user(s, owner).id)) == 0


def test_import_refuses_links_that_leave_the_folder(engines, case_id, tmp_path):
    from shared.cli import main

    outside = tmp_path / "outside"
    outside.mkdir()
    folder = tmp_path / "in"
    packet = _exported(case_id, folder)
    photo = folder / packet["files"][0]["uri"]
    (outside / "photo.jpg").write_bytes(photo.read_bytes())
    photo.unlink()
    photo.symlink_to(outside / "photo.jpg")  # the same bytes, but through a link to another folder
    (outside / "packet.json").write_text(json.dumps({**packet, "id": "linked-packet"}))
    (folder / "linked.json").symlink_to(outside / "packet.json")
    owner = new_user()
    r = CliRunner().invoke(main, ["import", "phenopackets", str(folder), "--owner", owner])
    assert r.exit_code != 0
    assert f"file {packet['files'][0]['uri']}: a link to a place outside the import folder" in r.output, r.output
    assert "linked.json: a link to a place outside the import folder" in r.output, r.output
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Case).where(Case.owner_id == find_user(s, owner).id)) == 0


@pytest.mark.parametrize("external_id", ["../../../../escape-x", "/tmp/escape-abs"])
def test_export_writes_only_inside_its_folder(engines, case_id, tmp_path, external_id):
    """A case whose id came in before ids were checked is still exported inside --out, and a link planted in the
    folder is not written through."""
    from shared.cli import main

    with session_scope() as s:
        legacy = s.get(Case, case_id)
        copy = Case(owner_id=legacy.owner_id, patient_ref="PT-PP-LEGACY", sex="male", external_id=external_id)
        s.add(copy)
        s.flush()
        s.add(Image(case_id=copy.id, sha256=legacy.images[0].sha256, object_key=legacy.images[0].object_key,
                    content_type=legacy.images[0].content_type, width=10, height=10, status="done"))
        copy_id = copy.id
    out = tmp_path / "deep" / "out"
    try:
        r = CliRunner().invoke(main, ["export", "phenopackets", "--out", str(out), "--case", str(copy_id)])
        assert r.exit_code == 0, r.output
        written = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
        assert all(p.parts[:2] == ("deep", "out") for p in written), written
        assert len([p for p in written if p.suffix == ".json"]) == 1 and not (tmp_path / "escape-x.json").exists()
        packet = json.loads(next((out).glob("*.json")).read_text())
        assert packet["id"] == external_id  # the packet keeps its id; only the file name is made safe

        target = tmp_path / "victim.txt"
        target.write_text("untouched")
        photo = out / packet["files"][0]["uri"]
        photo.unlink()
        photo.symlink_to(target)
        r = CliRunner().invoke(main, ["export", "phenopackets", "--out", str(out), "--case", str(copy_id)])
        assert r.exit_code != 0 and "does not write through links" in r.output, r.output
        assert target.read_text() == "untouched"
    finally:
        with session_scope() as s:
            s.execute(delete(Case).where(Case.id == copy_id))

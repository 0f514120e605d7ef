"""An admin's import of a photo archive, for the API and the admin console alike.

The request (:class:`web.schemas.PhotoImport`) brings a zip of ``<syndrome>/<patient>/<photo>`` folders, the owner's
e-mail, the consent and optionally a labels CSV. The archive's directory is checked before anything is unpacked
(:func:`shared.archives.unpack_archive`: entries, sizes, compression ratio, paths, links), it is unpacked into a
private temporary folder, that folder is checked as ``gestalt import photos`` checks one
(:func:`shared.photo_import.plan_photo_folder`, within ``GESTALT_IMPORT_CPU_SECONDS`` of processor time), and then
all of it is written or nothing (:func:`shared.imports.write_cases`). Every import, refused or not, is audited.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy.orm import Session
from werkzeug.datastructures import FileStorage, ImmutableMultiDict

from shared.archives import ArchiveLimits, unpack_archive
from shared.audit import audit
from shared.config import get_settings
from shared.imports import ImportRefused, enqueue_images, write_cases
from shared.photo_import import CONSENT_REQUIRED, LABELS_MAX_BYTES, plan_photo_folder
from shared.services import Refusal
from shared.storage import get_storage
from shared.users import find_user
from web.inputs import InputRejected
from web.schemas import ImportedCase, PhotoImport, PhotoImportResult, parse
from web.uploads import BudgetExceeded, CpuBudget


def parse_import(form: ImmutableMultiDict, files: ImmutableMultiDict) -> PhotoImport:
    """The request's fields and files as :class:`PhotoImport` (a file input left empty is no file), or a 400."""
    fields: dict[str, str | FileStorage] = {k: v for k, v in form.items() if k != "csrf_token"}
    for name in ("archive", "labels"):
        upload = files.get(name)
        if upload is not None and upload.filename:
            fields[name] = upload
    try:
        return parse(PhotoImport, fields)
    except InputRejected as exc:
        if exc.field == "consent":
            raise InputRejected("consent", f"must be yes: {CONSENT_REQUIRED}") from None
        raise


def import_archive(db: Session, body: PhotoImport, actor_id: int, ip: str | None) -> PhotoImportResult:
    """Check, unpack, check again and import ``body``'s archive; queue the new photos.

    Raises :class:`shared.imports.ImportRefused` with every problem, or a
    :class:`shared.services.Refusal`; nothing is written then but the audit row of the refusal."""
    owner = find_user(db, body.owner)
    if owner is None:
        raise Refusal(f"owner: no account {body.owner[:254]}", 400)
    labels = body.labels.stream.read(LABELS_MAX_BYTES + 1) if body.labels else None
    s = get_settings()
    detail = {"archive": (body.archive.filename or "")[:200], "owner": owner.id, "kind": body.kind}
    try:
        with tempfile.TemporaryDirectory(prefix="gestalt-import-") as tmp:
            root = unpack_archive(body.archive.stream, Path(tmp), ArchiveLimits.from_settings(s))
            with CpuBudget(s.import_cpu_seconds):
                plan = plan_photo_folder(db, root, consent=True, kind=body.kind, labels=labels,
                                         labels_name=(body.labels.filename or "labels")[:100] if body.labels else "")
            result = write_cases(db, get_storage(), plan.cases, owner.id, via="archive", actor_id=actor_id, ip=ip)
    except ImportRefused as exc:
        _refused(db, actor_id, ip, detail, exc.problems)
        raise
    except BudgetExceeded as exc:
        message = (f"checking the archive's photos took more than {s.import_cpu_seconds:g} s of processor time "
                   "(GESTALT_IMPORT_CPU_SECONDS); import it in smaller archives, or on the server with "
                   "`gestalt import photos`")
        _refused(db, actor_id, ip, detail, [message])
        raise Refusal(message, 413) from exc
    syndromes = {p.external_id: p.syndrome.name for p in plan.cases if p.syndrome is not None}
    cases = [ImportedCase(id=c.id, external_id=c.external_id, patient_ref=c.patient_ref,
                          syndrome=syndromes[c.external_id], photos=len(c.images)) for c in result.cases]
    audit(db, "photo_import", actor_id, "user", owner.id, ip=ip, **detail, cases=[c.id for c in cases],
          skipped=len(result.skipped), photos=len(result.image_ids), ignored=len(plan.ignored))
    db.commit()
    enqueue_images(result.image_ids)
    return PhotoImportResult(cases=cases, skipped=result.skipped, photos=len(result.image_ids))


def _refused(db: Session, actor_id: int, ip: str | None, detail: dict, problems: list[str]) -> None:
    db.rollback()
    audit(db, "photo_import_refused", actor_id, "user", detail["owner"], ip=ip, **detail, problems=len(problems),
          first=problems[:20])
    db.commit()

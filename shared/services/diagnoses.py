"""Entering the confirmed diagnosis of a case (portal form and API share this)."""
from __future__ import annotations

import re

from sqlalchemy.orm import Session

from shared.audit import audit
from shared.models import Case, Diagnosis, Syndrome
from shared.services import Refusal

DIAGNOSIS_KINDS = ("clinical", "molecular")
GENE_MAX, VARIANT_MAX = 32, 255  # the columns' lengths
LABEL_CODE = re.compile(r"\(((?:OMIM|ORPHA):\d{1,7})\)\s*$", re.IGNORECASE)


class DiagnosisError(Refusal):
    """A diagnosis the form or the API cannot record (400)."""


def find_syndrome(db: Session, ref: str | int | None) -> Syndrome:
    """A catalogue syndrome by database id, exact name, OMIM/Orphanet ID (``OMIM:122470``, ``ORPHA:2322``)
    or the autocomplete's label (``Name (OMIM:122470)``)."""
    from shared.catalog import find_syndrome as by_name_or_code

    ref = str(ref or "").strip()
    if not ref:
        raise DiagnosisError("choose the confirmed syndrome")
    syndrome = None
    if ref.isascii() and ref.isdigit() and len(ref) < 10:  # str.isdigit also accepts "¹" and other digits
        syndrome = db.get(Syndrome, int(ref))
    syndrome = syndrome or by_name_or_code(db, ref)
    label = LABEL_CODE.search(ref)
    if syndrome is None and label:
        syndrome = by_name_or_code(db, label.group(1))
    if syndrome is None:
        raise DiagnosisError(f"unknown syndrome {ref[:100]!r}: pick one from the catalogue "
                             "(a name, or an ID such as OMIM:122470 or ORPHA:2322)")
    return syndrome


def set_diagnosis(db: Session, case: Case, fields: dict, user_id: int, ip: str | None) -> Diagnosis:
    """Record or update the case's confirmed diagnosis from ``fields`` (syndrome, kind, gene, variant,
    consent; the API's :class:`web.schemas.DiagnosisUpdate` checks their types). A field not given keeps its
    stored value; with consent the photos join the next retraining, and withdrawing consent takes them out of it."""
    diagnosis = case.diagnosis
    if diagnosis is None and fields.get("syndrome") is None:
        raise DiagnosisError("choose the confirmed syndrome")
    kind = fields.get("kind") or (diagnosis.kind if diagnosis else "clinical")
    if kind not in DIAGNOSIS_KINDS:
        raise DiagnosisError(f"kind must be one of {', '.join(DIAGNOSIS_KINDS)}")
    for name, limit in (("gene", GENE_MAX), ("variant", VARIANT_MAX)):
        if len(fields.get(name) or "") > limit:
            raise DiagnosisError(f"{name} has at most {limit} characters")
    syndrome = find_syndrome(db, fields["syndrome"]) if fields.get("syndrome") is not None else None
    if diagnosis is None:
        case.diagnosis = diagnosis = Diagnosis(case_id=case.id)  # through the relationship, so the payload sees it
    had_consent = bool(diagnosis.consent)
    if syndrome is not None:
        diagnosis.syndrome_id = syndrome.id
    diagnosis.kind = kind
    if "gene" in fields:
        diagnosis.gene = (fields["gene"] or "").strip() or None
    if "variant" in fields:
        diagnosis.variant = (fields["variant"] or "").strip() or None
    if fields.get("consent") is not None:
        diagnosis.consent = bool(fields["consent"])
    diagnosis.consent = bool(diagnosis.consent)
    diagnosis.diagnosed_by = user_id
    db.add(diagnosis)
    db.flush()
    audit(db, "diagnosis", user_id, "case", case.id, ip=ip, syndrome_id=diagnosis.syndrome_id, kind=kind,
          consent=diagnosis.consent, fields=sorted(fields))
    if had_consent and not diagnosis.consent:
        # The retraining and the gallery select consented diagnoses when they run: these photos are out.
        audit(db, "consent_withdrawn", user_id, "case", case.id, ip=ip)
    db.commit()
    return diagnosis


def diagnosis_payload(db: Session, case: Case) -> dict | None:
    d = case.diagnosis
    if d is None:
        return None
    syndrome = db.get(Syndrome, d.syndrome_id)
    return {"syndrome": {"id": syndrome.id, "name": syndrome.name, "omim": syndrome.omim, "orpha": syndrome.orpha,
                         "genes": list(syndrome.genes or [])}, "kind": d.kind,
            "gene": d.gene, "variant": d.variant, "consent": d.consent, "recorded_at": d.created_at.isoformat()}

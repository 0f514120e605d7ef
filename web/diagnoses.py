"""Entering the confirmed diagnosis of a case (portal form and API share this)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy.orm import Session

from shared.audit import audit
from shared.models import Case, Diagnosis, Syndrome

KINDS = ("clinical", "molecular")
LABEL_CODE = re.compile(r"\(((?:OMIM|ORPHA):\d{1,7})\)\s*$", re.IGNORECASE)


@dataclass
class DiagnosisError(ValueError):
    message: str


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


def set_diagnosis(db: Session, case: Case, syndrome_ref: str | int | None, kind: str, gene: str | None,
                  variant: str | None, consent: bool, user_id: int, ip: str | None) -> Diagnosis:
    """Record (or replace) the case's confirmed diagnosis; with consent it joins the next retraining."""
    if not isinstance(kind, str) or kind not in KINDS:
        raise DiagnosisError(f"kind must be one of {', '.join(KINDS)}")
    for name, value in (("gene", gene), ("variant", variant), ("syndrome", syndrome_ref)):
        if value is not None and not isinstance(value, str | int):
            raise DiagnosisError(f"{name} must be text")
        if isinstance(value, str) and "\x00" in value:
            raise DiagnosisError(f"{name} contains a NUL character")
    if isinstance(syndrome_ref, (list, dict, bool)):
        raise DiagnosisError("syndrome must be a catalogue name, id, or OMIM/Orphanet ID")
    syndrome = find_syndrome(db, syndrome_ref)
    if case.diagnosis is None:
        case.diagnosis = Diagnosis(case_id=case.id)  # through the relationship, so the payload sees it
    diagnosis = case.diagnosis
    diagnosis.syndrome_id = syndrome.id
    diagnosis.kind = kind
    diagnosis.gene = (gene or "").strip()[:32] or None
    diagnosis.variant = (variant or "").strip()[:255] or None
    diagnosis.consent = bool(consent)
    diagnosis.diagnosed_by = user_id
    db.add(diagnosis)
    db.flush()
    audit(db, "diagnosis", user_id, "case", case.id, ip=ip, syndrome_id=syndrome.id, kind=kind, consent=consent)
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

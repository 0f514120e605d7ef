"""Entering the confirmed diagnosis of a case (portal form and API share this)."""
from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.audit import audit
from shared.models import Case, Diagnosis, Syndrome

KINDS = ("clinical", "molecular")


@dataclass
class DiagnosisError(ValueError):
    message: str


def find_syndrome(db: Session, ref: str | int | None) -> Syndrome:
    ref = str(ref or "").strip()
    if not ref:
        raise DiagnosisError("choose the confirmed syndrome")
    stmt = select(Syndrome).where((Syndrome.name == ref) | (Syndrome.omim == ref))
    if ref.isascii() and ref.isdigit():  # str.isdigit also accepts "¹" and other non-ASCII digits
        stmt = select(Syndrome).where((Syndrome.id == int(ref)) | (Syndrome.name == ref) | (Syndrome.omim == ref))
    syndrome = db.scalars(stmt).first()
    if syndrome is None:
        raise DiagnosisError(f"unknown syndrome {ref!r}: pick one from the catalogue")
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
        raise DiagnosisError("syndrome must be a catalogue name, id or OMIM number")
    syndrome = find_syndrome(db, syndrome_ref)
    diagnosis = case.diagnosis or Diagnosis(case_id=case.id)
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
    return {"syndrome": {"id": syndrome.id, "name": syndrome.name, "omim": syndrome.omim}, "kind": d.kind,
            "gene": d.gene, "variant": d.variant, "consent": d.consent, "recorded_at": d.created_at.isoformat()}

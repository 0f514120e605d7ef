"""Creating and correcting cases (the portal's form and the API call these with validated fields)."""
from __future__ import annotations

from sqlalchemy.orm import Session

from shared.audit import audit
from shared.models import Case

CASE_FIELDS = ("patient_ref", "sex", "age_years", "ancestry", "hpo_terms")


def create_case(db: Session, owner_id: int, fields: dict, ip: str | None, via: str | None = None) -> Case:
    """A new case of ``owner_id`` from validated ``fields`` (any of :data:`CASE_FIELDS`); audited, committed."""
    case = Case(owner_id=owner_id, **{name: fields[name] for name in CASE_FIELDS if name in fields})
    db.add(case)
    db.flush()
    audit(db, "case_create", owner_id, "case", case.id, ip=ip, **({"via": via} if via else {}))
    db.commit()
    return case


def update_case(db: Session, case: Case, fields: dict, user_id: int, ip: str | None, via: str = "portal") -> list[str]:
    """Apply validated ``fields`` (any of :data:`CASE_FIELDS`) to ``case``; audit which changed (names only)."""
    changed = [name for name in CASE_FIELDS if name in fields and fields[name] != getattr(case, name)]
    for name in changed:
        setattr(case, name, fields[name])
    if changed:
        audit(db, "case_edit", user_id, "case", case.id, ip=ip, via=via, changed=changed)
    db.commit()
    return changed

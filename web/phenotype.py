"""The case page's phenotype part (:mod:`shared.services.phenotype`), with the gallery loaded once per request: the
similar-patients list and the joint ranking's gallery feature of one page (or poll) share it."""
from __future__ import annotations

from sqlalchemy.orm import Session

from shared.models import Case
from shared.services import phenotype
from shared.services.ranking import CaseRanking


def request_gallery(db: Session, space: tuple):
    """The gallery of ``space``, loaded once per request."""
    from flask import g, has_app_context

    from shared.modelops.gallery import load_gallery

    if not has_app_context():
        return load_gallery(db, space)
    cache = g.setdefault("galleries", {})
    if space not in cache:
        cache[space] = load_gallery(db, space)
    return cache[space]


def phenotype_payload(db: Session, case: Case, active_id: int | None,
                      ranking: CaseRanking | None = None) -> dict | None:
    """:func:`shared.services.phenotype.phenotype_payload` with this request's gallery."""
    return phenotype.phenotype_payload(db, case, active_id, ranking, load=request_gallery)

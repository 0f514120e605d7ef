"""Who may see what: clinicians see their own cases, admins see all."""
from __future__ import annotations

from flask import abort
from flask_login import current_user
from sqlalchemy import Select, select

from shared.models import Case, Image
from web.db import get_db


def visible_cases() -> Select:
    stmt = select(Case)
    if not current_user.is_admin:
        stmt = stmt.where(Case.owner_id == current_user.id)
    return stmt


def case_or_404(case_id: int) -> Case:
    """The case if the current user may see it; 404 otherwise (existence is not revealed)."""
    case = get_db().scalars(visible_cases().where(Case.id == case_id)).first()
    if case is None:
        abort(404)
    return case


def image_or_404(image_id: int) -> Image:
    image = get_db().get(Image, image_id)
    if image is None:
        abort(404)
    case_or_404(image.case_id)
    return image

"""The audit log: every view, upload, diagnosis, export and admin action."""
from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from shared.models import AuditLog

logger = logging.getLogger(__name__)


def _clean(value):
    """PostgreSQL text and JSONB cannot hold NUL characters; user-supplied strings may."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_clean(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def audit(session: Session, action: str, user_id: int | None, target_type: str | None = None,
          target_id: object | None = None, ip: str | None = None, **detail) -> None:
    """Add an audit row to ``session``; it commits with the action it records."""
    session.add(AuditLog(user_id=user_id, action=action, target_type=target_type,
                         target_id=None if target_id is None else str(target_id), ip=ip, detail=_clean(detail)))
    logger.info("audit action=%s user=%s target=%s:%s", action, user_id, target_type, target_id)

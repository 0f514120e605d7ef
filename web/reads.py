"""Every read of patient data leaves an audit row: pages, the API, searches and the case page's polls.

A case page polls its case every second or ten while photos are processed; auditing each poll would bury
the log, skipping them would let a script read every result unaudited. A poll is audited once per case and
login (portal session or API token): the first poll writes the row, and a Redis key remembers it for the
longest a session lives. When Redis cannot answer, every poll is audited.
"""
from __future__ import annotations

import logging

from flask import request
from flask_login import current_user
from sqlalchemy.orm import Session

from shared.audit import audit
from shared.config import get_settings

logger = logging.getLogger(__name__)
_client = None


def audit_read(db: Session, action: str, target_type: str | None, target_id: object | None, *,
               once_per_login: bool = False, **detail) -> None:
    """Audit (and commit) that the current user read ``target``; with ``once_per_login``, only the first such read
    of this login."""
    if once_per_login and _audited_before(action, target_type, target_id):
        return
    audit(db, action, current_user.id, target_type, target_id, ip=request.remote_addr, **detail)
    db.commit()


def _audited_before(action: str, target_type: str | None, target_id: object | None) -> bool:
    global _client
    settings = get_settings()
    login = getattr(current_user, "login_key", None)
    if not settings.redis_url or not login:
        return False
    import redis

    try:
        if _client is None:
            _client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
        first = _client.set(f"gestalt:audited:{login}:{action}:{target_type}:{target_id}", 1, nx=True,
                            ex=int(settings.session_max_hours * 3600) + 60)
    except redis.RedisError as exc:
        logger.warning("audit state=redis_unavailable action=%s error=%s; auditing every read", action, exc)
        return False
    return not first

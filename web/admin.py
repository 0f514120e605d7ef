"""Admin pages (admins only)."""
from __future__ import annotations

from flask import Blueprint, render_template, request
from flask_login import current_user
from sqlalchemy import select

from shared.audit import audit
from shared.models import AuditLog, User
from web.auth import admin_required
from web.db import get_db

bp = Blueprint("admin", __name__, url_prefix="/admin")
PAGE = 200


@bp.before_request
@admin_required
def _admins_only():
    return None


@bp.get("/audit")
def audit_log():
    """The latest audit entries, filterable by action and user."""
    db = get_db()
    stmt = select(AuditLog, User.email).outerjoin(User, User.id == AuditLog.user_id)
    action = request.args.get("action", "").strip()
    email = request.args.get("user", "").strip().lower()
    if action:
        stmt = stmt.where(AuditLog.action == action)
    if email:
        stmt = stmt.where(User.email == email)
    rows = db.execute(stmt.order_by(AuditLog.id.desc()).limit(PAGE)).all()
    actions = db.scalars(select(AuditLog.action).distinct().order_by(AuditLog.action)).all()
    audit(db, "audit_view", current_user.id, ip=request.remote_addr, filter_action=action or None,
          filter_user=email or None)
    db.commit()
    return render_template("admin/audit.html", rows=rows, actions=actions, action=action, user=email)

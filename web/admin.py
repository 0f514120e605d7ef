"""The admin console (admins only): queues and workers, users, models and training runs, audit log."""
from __future__ import annotations

import secrets

from flask import Blueprint, flash, redirect, render_template, request, url_for
from flask_login import current_user
from sqlalchemy import select

from shared import dispatch, monitoring, photos
from shared.audit import audit
from shared.models import AuditLog, Image, ImageStatus, ModelVersion, Role, User
from shared.services import Refusal
from shared.users import UserError, create_user, disable_user, reset_password
from web import limits
from web.auth import admin_required
from web.db import get_db
from web.inputs import InputRejected

bp = Blueprint("admin", __name__, url_prefix="/admin")
PAGE = 100  # audit rows per page


@bp.before_request
@admin_required
def _admins_only():
    return None


def _done(message: str, endpoint: str, category: str = "info"):
    flash(message, category)
    get_db().commit()
    return redirect(url_for(endpoint), 303)


# ------------------------------------------------------------------ queues
@bp.get("/")
def queues():
    """Queue depths, the last hour's outcomes and latencies, workers, and failed photos."""
    from shared.modelops import registry

    db = get_db()
    pings = dispatch.ping_workers(timeout=1.0)
    failed = db.scalars(select(Image).where(Image.status == ImageStatus.failed.value)
                        .order_by(Image.updated_at.desc()).limit(100)).all()
    active = registry.active_version(db)
    return render_template("admin/queues.html", depths=monitoring.queue_depths(),
                           activity=monitoring.recent_activity(db), pings=pings, charts=_charts(db),
                           beats=monitoring.heartbeats(), failed=failed, active=active)


def _charts(db, hours: float = 6) -> dict:
    """Throughput, processing latency and queue depth over the last hours, as inline SVG."""
    from web.charts import line_chart

    series = monitoring.activity_series(db, hours)
    per = f"photos per {series['bucket_minutes']} min"
    charts = {
        "throughput": line_chart(series["t"], {"finished": series["done"]}, f"Throughput, last {hours:g} h", per),
        "latency": line_chart(series["t"], {"p50": series["p50"], "p95": series["p95"]},
                              "End-to-end processing (waiting for a model left out)", "seconds"),
    }
    samples = monitoring.depth_history(hours)
    if samples:
        queues = [q for q in monitoring.QUEUES if any(s.get(q) for s in samples)] or ["detect"]
        charts["depth"] = line_chart([s["t"] for s in samples], {q: [s.get(q) for s in samples] for q in queues},
                                     "Queue depth (sampled by the sweep)", "messages waiting")
    return charts


@bp.post("/images/<int:image_id>/retry")
def retry_image(image_id: int):
    db = get_db()
    image = photos.lock(db, image_id)
    if image is None or not photos.allows(image.status, photos.Event.retry):
        return _done("Only failed photos can be retried.", "admin.queues", "error")
    photos.retry(image)
    audit(db, "admin_retry", current_user.id, "image", image.id, ip=request.remote_addr)
    db.commit()
    dispatch.enqueue_photo(image.id)
    return _done(f"Photo {image_id} queued again.", "admin.queues")


@bp.post("/images/<int:image_id>/cancel")
def cancel_image(image_id: int):
    db = get_db()
    image = photos.lock(db, image_id)
    if image is None or not photos.allows(image.status, photos.Event.cancel):
        return _done("That photo is already finished.", "admin.queues", "error")
    photos.cancel(image)
    audit(db, "admin_cancel", current_user.id, "image", image.id, ip=request.remote_addr)
    return _done(f"Photo {image_id} cancelled.", "admin.queues")


# ------------------------------------------------------------------ users
@bp.get("/users")
def users():
    return render_template("admin/users.html", users=get_db().scalars(select(User).order_by(User.email)).all(),
                           roles=[r.value for r in Role])


@bp.post("/users")
def create_account():
    db = get_db()
    role = request.form.get("role", "clinician")
    if role not in {r.value for r in Role}:
        return _done("Unknown role.", "admin.users", "error")
    temporary = secrets.token_urlsafe(12)
    try:
        user = create_user(db, request.form.get("email", ""), temporary, Role(role), must_change_password=True)
    except UserError as exc:
        db.rollback()
        return _done(str(exc), "admin.users", "error")
    audit(db, "user_create", current_user.id, "user", user.id, ip=request.remote_addr, role=role)
    flash(f"{user.email} must choose their own password at the first login.", "info")
    return _done(f"Created {user.email}. Temporary password (shown once): {temporary}", "admin.users")


@bp.post("/users/<int:user_id>")
def update_account(user_id: int):
    db = get_db()
    user = db.get(User, user_id)
    if user is None:
        return _done("No such user.", "admin.users", "error")
    action = request.form.get("action")
    if user.id == current_user.id and action in ("disable", "role"):
        return _done("You cannot disable yourself or change your own role.", "admin.users", "error")
    if action == "disable":
        disable_user(db, user)
        message = f"{user.email} disabled; their sessions and API tokens have ended."
    elif action == "enable":
        user.is_active = True
        message = f"{user.email} enabled."
    elif action == "reset":
        temporary = reset_password(db, user)
        flash(f"{user.email} must choose a new password at their next login; their sessions and API tokens "
              "have ended.", "info")
        message = f"New temporary password for {user.email} (shown once): {temporary}"
    elif action == "role" and request.form.get("role") in {r.value for r in Role}:
        user.role = request.form["role"]
        message = f"{user.email} is now {user.role}."
    else:
        return _done("Unknown action.", "admin.users", "error")
    audit(db, f"user_{action}", current_user.id, "user", user.id, ip=request.remote_addr)
    return _done(message, "admin.users")


# ------------------------------------------------------------------ models
@bp.get("/models")
def models():
    from shared.modelops.retrain import latest_runs
    from shared.services.phenotype import combiner_status

    db = get_db()
    versions = db.scalars(select(ModelVersion).order_by(ModelVersion.id.desc())).all()
    parents = {v.id: v.name for v in versions}  # a retrained version names the one it started from
    return render_template("admin/models.html", versions=versions, runs=latest_runs(db, 30), parents=parents,
                           combiner=combiner_status())


@bp.post("/models/<int:version_id>/activate")
def activate_model(version_id: int):
    from shared.modelops import registry

    db = get_db()
    version = db.get(ModelVersion, version_id)
    if version is None or (version.status == "rejected" and request.form.get("confirm") != "yes"):
        return _done("That version cannot be activated (rejected versions need confirmation).", "admin.models",
                     "error")
    registry.activate(db, version)
    audit(db, "model_activate", current_user.id, "model_version", version.id, ip=request.remote_addr)
    db.commit()
    dispatch.wake_waiting_photos()
    return _done(f"{version.name} is now the active model.", "admin.models")


@bp.post("/models/rollback")
def rollback_model():
    from shared.modelops.retrain import rollback

    db = get_db()
    try:
        version = rollback(db)
    except LookupError as exc:
        return _done(str(exc), "admin.models", "error")
    audit(db, "model_rollback", current_user.id, "model_version", version.id, ip=request.remote_addr)
    db.commit()
    dispatch.wake_waiting_photos()
    return _done(f"Rolled back to {version.name}.", "admin.models")


@bp.post("/retrain")
def start_retrain():
    kind = "full" if request.form.get("kind") == "full" else "heads"
    dry_run = request.form.get("dry_run") == "yes"
    dispatch.queue_retrain("admin", dry_run=dry_run, kind=kind)
    audit(get_db(), "retrain_start", current_user.id, ip=request.remote_addr, kind=kind, dry_run=dry_run)
    return _done(f"Retraining ({kind}{', dry run' if dry_run else ''}) queued on the train queue.", "admin.models")


# ------------------------------------------------------------------ imports
@bp.get("/imports")
def imports():
    return render_template("admin/imports.html", result=None, problems=[])


@bp.post("/imports")
@limits.imports
def import_photos():
    """The form's archive as cases (web/imports.py): the cases created, or every problem (400) and nothing."""
    from shared.imports import ImportRefused
    from web.imports import import_archive, parse_import

    try:
        result = import_archive(get_db(), parse_import(request.form, request.files), current_user.id,
                                request.remote_addr)
    except ImportRefused as exc:
        return render_template("admin/imports.html", result=None, problems=exc.problems), 400
    except Refusal as exc:
        return render_template("admin/imports.html", result=None, problems=[exc.message]), exc.status
    except InputRejected as exc:
        return render_template("admin/imports.html", result=None, problems=[exc.description]), 400
    return render_template("admin/imports.html", result=result, problems=[]), 201 if result.cases else 200


# ------------------------------------------------------------------ audit
@bp.get("/audit")
def audit_log():
    """The audit log, newest first, a page at a time; filtered by action, user and dates (UTC days)."""
    from datetime import UTC, datetime, timedelta

    db = get_db()
    stmt = select(AuditLog, User.email).outerjoin(User, User.id == AuditLog.user_id)
    action = request.args.get("action", "").strip()
    email = request.args.get("user", "").strip().lower()
    since, until = request.args.get("from", "").strip(), request.args.get("to", "").strip()
    try:
        start = datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=UTC) if since else None
        end = datetime.strptime(until, "%Y-%m-%d").replace(tzinfo=UTC) + timedelta(days=1) if until else None
    except ValueError:
        return _bad_filter("dates are YYYY-MM-DD")
    raw_page = request.args.get("page", "1")
    page = int(raw_page) if raw_page.isascii() and raw_page.isdigit() and 0 < len(raw_page) < 7 else 1
    if action:
        stmt = stmt.where(AuditLog.action == action)
    if email:
        stmt = stmt.where(User.email == email)
    if start:
        stmt = stmt.where(AuditLog.at >= start)
    if end:
        stmt = stmt.where(AuditLog.at < end)
    rows = db.execute(stmt.order_by(AuditLog.id.desc()).offset((max(page, 1) - 1) * PAGE).limit(PAGE + 1)).all()
    actions = db.scalars(select(AuditLog.action).distinct().order_by(AuditLog.action)).all()
    audit(db, "audit_view", current_user.id, ip=request.remote_addr, filter_action=action or None,
          filter_user=email or None, filter_from=since or None, filter_to=until or None, page=page)
    db.commit()
    filters = {k: v for k, v in (("action", action), ("user", email), ("from", since), ("to", until)) if v}
    return render_template("admin/audit.html", rows=rows[:PAGE], actions=actions, action=action, user=email,
                           since=since, until=until, page=page, more=len(rows) > PAGE, filters=filters)


def _bad_filter(message: str):
    from werkzeug.exceptions import BadRequest

    raise BadRequest(message)

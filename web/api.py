"""JSON API under /api/v1 (same login as the portal)."""
from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask_login import current_user

from shared.audit import audit
from web.access import case_or_404, image_or_404
from web.db import get_db
from web.results import case_payload, image_payload

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.get("/cases/<int:case_id>")
def get_case(case_id: int):
    db = get_db()
    case = case_or_404(case_id)
    payload = case_payload(db, case)
    if any(i["result"] for i in payload["images"]) and request.args.get("poll") != "1":
        audit(db, "result_view", current_user.id, "case", case.id, ip=request.remote_addr, via="api")
        db.commit()
    return jsonify(payload)


@bp.get("/images/<int:image_id>")
def get_image(image_id: int):
    db = get_db()
    image = image_or_404(image_id)
    from shared.ml.registry import active_version

    active = active_version(db)
    payload = image_payload(db, image, active.id if active else None)
    if payload["result"]:
        audit(db, "result_view", current_user.id, "image", image.id, ip=request.remote_addr, via="api")
        db.commit()
    return jsonify(payload)


@bp.get("/images/<int:image_id>/aligned")
def aligned_face(image_id: int):
    """A short-lived presigned URL for this image's aligned face, and nothing else."""
    from shared.storage import PRESIGN_SECONDS, get_storage

    db = get_db()
    image = image_or_404(image_id)
    if image.face is None or not image.face.aligned_key:
        return jsonify(error="this photo has no aligned face yet"), 404
    audit(db, "aligned_view", current_user.id, "image", image.id, ip=request.remote_addr, via="api")
    db.commit()
    return jsonify(url=get_storage().presigned_url(image.face.aligned_key), expires_in=PRESIGN_SECONDS)

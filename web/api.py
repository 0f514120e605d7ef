"""JSON API under /api/v1 (same login as the portal)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request
from flask_login import current_user

from shared.audit import audit
from web import limits
from web.access import case_or_404, image_or_404
from web.auth import admin_required
from web.db import get_db
from web.reads import audit_read
from web.results import case_payload, image_payload
from web.schemas import CaseUpdate, DiagnosisUpdate, NewCase, parse

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.get("/openapi.json")
def openapi():
    from web.openapi import SPEC

    return jsonify(SPEC)


@bp.get("/cases")
def list_cases():
    from shared.models import Case
    from web.access import visible_cases

    db = get_db()
    cases = db.scalars(visible_cases().order_by(Case.created_at.desc()).limit(500)).all()
    audit_read(db, "case_list", None, None, via="api", cases=[c.id for c in cases])
    return jsonify(cases=[{"id": c.id, "patient_ref": c.patient_ref, "sex": c.sex, "age_years": c.age_years,
                           "created_at": c.created_at.isoformat(), "photos": len(c.images)} for c in cases])


@bp.post("/cases")
def create_case():
    """JSON ``{"patient_ref", "sex", "age_years", "ancestry", "hpo_terms"}``; the ID must be pseudonymous."""
    from shared.catalog import CatalogError, validate_hpo_terms
    from shared.services import cases

    body = parse(NewCase, request.get_json(silent=True))
    db = get_db()
    try:
        terms = validate_hpo_terms(db, body.hpo_terms)
    except CatalogError as exc:
        return jsonify(error=str(exc)), 400
    case = cases.create_case(db, current_user.id, {"patient_ref": body.patient_ref, "sex": body.sex,
                                                   "age_years": body.age_years, "ancestry": body.ancestry or None,
                                                   "hpo_terms": terms}, request.remote_addr, via="api")
    return jsonify(_payload(db, case)), 201


@bp.patch("/cases/<int:case_id>")
def patch_case(case_id: int):
    """Correct a case: JSON with any of patient_ref, sex, age_years, ancestry, hpo_terms (audited)."""
    from shared.catalog import CatalogError, validate_hpo_terms
    from shared.services.cases import update_case

    db = get_db()
    case = case_or_404(case_id)
    body = parse(CaseUpdate, request.get_json(silent=True))
    fields = body.model_dump(exclude_unset=True)
    for required in ("patient_ref", "sex"):
        if required in fields and fields[required] is None:
            return jsonify(error=f"{required} cannot be cleared"), 400
    if "hpo_terms" in fields:
        try:
            fields["hpo_terms"] = validate_hpo_terms(db, fields["hpo_terms"] or [])
        except CatalogError as exc:
            return jsonify(error=str(exc)), 400
    update_case(db, case, fields, current_user.id, request.remote_addr, via="api")
    return jsonify(_payload(db, case))


def _payload(db, case) -> dict:
    return case_payload(db, case, current_user.id, current_user.is_admin)


@bp.get("/hpo")
def hpo_search():
    """HPO terms matching ``q`` (ID, name or synonym), for the case form's autocomplete."""
    from shared.catalog import search_hpo

    return jsonify(terms=search_hpo(get_db(), request.args.get("q", ""), _limit()))


@bp.get("/syndromes")
def syndrome_search():
    """Catalogue syndromes matching ``q`` (name, OMIM/Orphanet ID or gene), with their genes."""
    from shared.catalog import search_syndromes

    return jsonify(syndromes=search_syndromes(get_db(), request.args.get("q", ""), _limit()))


def _limit() -> int:
    raw = request.args.get("limit", "20")
    return max(1, min(50, int(raw))) if raw.isascii() and raw.isdigit() else 20


@bp.post("/cases/<int:case_id>/images")
@limits.photos
def add_images(case_id: int):
    """Photos (multipart field ``photo``, repeatable): all stored and queued, or none."""
    from web.uploads import receive_photos

    db = get_db()
    case = case_or_404(case_id)
    images = receive_photos(db, case, request.files.getlist("photo"), current_user.id, request.remote_addr)
    return jsonify(images=[{"id": i.id, "status": i.status} for i in images]), 201


@bp.get("/cases/<int:case_id>")
def get_case(case_id: int):
    db = get_db()
    case = case_or_404(case_id)
    payload = _payload(db, case)
    # A poll (the case page's, every few seconds) is audited once per case and login; any other read every time.
    poll = request.args.get("poll") == "1"
    audit_read(db, "case_view", "case", case.id, once_per_login=poll, via="api", poll=poll)
    return jsonify(payload)


@bp.get("/cases/<int:case_id>/phenopacket")
def get_phenopacket(case_id: int):
    """The case as a GA4GH Phenopacket v2 (audited as an export)."""
    from shared.phenopackets import case_packet, packet_json

    db = get_db()
    case = case_or_404(case_id)
    audit(db, "phenopacket_export", current_user.id, "case", case.id, ip=request.remote_addr, via="api")
    db.commit()
    return current_app.response_class(packet_json(case_packet(db, case)), mimetype="application/json")


@bp.get("/images/<int:image_id>")
def get_image(image_id: int):
    db = get_db()
    image = image_or_404(image_id)
    from shared.modelops.versions import active_version

    active = active_version(db)
    payload = image_payload(db, image, active.id if active else None)
    audit_read(db, "image_view", "image", image.id, via="api")
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


@bp.route("/cases/<int:case_id>/diagnosis", methods=["POST", "PATCH"])
def put_diagnosis(case_id: int):
    """JSON ``{"syndrome": name|id|OMIM, "kind": "clinical"|"molecular", "gene", "variant", "consent": bool}``.

    A field left out keeps its stored value (the first diagnosis of a case needs ``syndrome``);
    ``"consent": false`` withdraws consent, which is audited and ends the photos' use in training."""
    from shared.services.diagnoses import diagnosis_payload, set_diagnosis

    db = get_db()
    case = case_or_404(case_id)
    update = parse(DiagnosisUpdate, request.get_json(silent=True))
    set_diagnosis(db, case, update.model_dump(exclude_unset=True), current_user.id, request.remote_addr)
    return jsonify(diagnosis_payload(db, case))


@bp.post("/images/<int:image_id>/rescore")
@limits.rescores
def rescore(image_id: int):
    """Score this photo again with the active model (its old result is kept)."""
    from shared import dispatch, photos
    from shared.models import ImageStatus

    db = get_db()
    image = photos.lock(db, image_or_404(image_id).id)
    if not photos.allows(image.status, photos.Event.rescore):
        if image.status in photos.ACTIVE:
            return jsonify(error="this photo is still being processed"), 409
        return jsonify(error=f"this photo was rejected: {image.reason}"), 409
    photos.rescore(image)
    audit(db, "rescore", current_user.id, "image", image.id, ip=request.remote_addr)
    db.commit()
    scoring = image.status == ImageStatus.scoring.value
    (dispatch.enqueue_scoring if scoring else dispatch.enqueue_photo)(image.id)
    return jsonify(id=image.id, status=image.status), 202


@bp.post("/admin/imports/photos")
@admin_required
@limits.imports
def import_photos():
    """A zip of <syndrome>/<patient>/<photo> folders as cases of ``owner`` (multipart: archive, owner, consent=yes,
    kind, labels): 201 with the cases created (200 when all were imported before), or 400 with every problem."""
    from shared.imports import ImportRefused
    from web.imports import import_archive, parse_import
    from web.schemas import ImportProblems

    body = parse_import(request.form, request.files)
    try:
        result = import_archive(get_db(), body, current_user.id, request.remote_addr)
    except ImportRefused as exc:
        problems = ImportProblems(error=f"nothing was imported: {len(exc.problems)} problem(s)", problems=exc.problems)
        return jsonify(problems.model_dump()), 400
    return jsonify(result.model_dump()), 201 if result.cases else 200

"""JSON API under /api/v1 (same login as the portal)."""
from __future__ import annotations

from flask import Blueprint, current_app, jsonify, render_template, request
from flask_login import current_user

from shared.audit import audit
from web import limits
from web.access import case_or_404, image_or_404
from web.auth import admin_required
from web.db import get_db
from web.openapi import document, operation
from web.reads import audit_read
from web.responses import (
    AlignedUrl,
    CaseList,
    CasePayload,
    DiagnosisRecord,
    HpoMatches,
    ImagePayload,
    ImagesAccepted,
    ImageState,
    OpenApiDocument,
    Phenopacket,
    SyndromeMatches,
)
from web.results import case_payload, image_payload
from web.schemas import (
    CaseQuery,
    CaseUpdate,
    DiagnosisUpdate,
    ImportProblems,
    NewCase,
    PhotoImport,
    PhotoImportResult,
    PhotoUpload,
    SearchQuery,
    parse,
)

bp = Blueprint("api", __name__, url_prefix="/api/v1")


@bp.get("/openapi.json")
@operation({200: OpenApiDocument})
def openapi():
    """This API's OpenAPI 3.1 document"""
    return jsonify(document(current_app))


@bp.get("/docs")
@operation({200: "text/html"})
def docs():
    """This API's document as a page"""
    from web.apidocs import page

    return render_template("api_docs.html", **page(document(current_app)))


@bp.get("/cases")
@operation({200: CaseList})
def list_cases():
    """Your cases (every case for an administrator)"""
    from shared.models import Case
    from web.access import visible_cases

    db = get_db()
    cases = db.scalars(visible_cases().order_by(Case.created_at.desc()).limit(500)).all()
    audit_read(db, "case_list", None, None, via="api", cases=[c.id for c in cases])
    return jsonify(cases=[{"id": c.id, "patient_ref": c.patient_ref, "sex": c.sex, "age_years": c.age_years,
                           "created_at": c.created_at.isoformat(), "photos": len(c.images)} for c in cases])


@bp.post("/cases")
@operation({201: CasePayload}, body=NewCase)
def create_case():
    """Create a case"""
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
@operation({200: CasePayload}, body=CaseUpdate)
def patch_case(case_id: int):
    """Correct a case's details (audited)"""
    from shared.catalog import CatalogError, validate_hpo_terms
    from shared.services.cases import update_case

    db = get_db()
    case = case_or_404(case_id)
    body = parse(CaseUpdate, request.get_json(silent=True))
    fields = body.model_dump(exclude_unset=True)
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
@operation({200: HpoMatches}, query=SearchQuery)
def hpo_search():
    """HPO terms matching a text (ID, name or synonym), for autocomplete"""
    from shared.catalog import search_hpo

    query = parse(SearchQuery, request.args.to_dict())
    return jsonify(terms=search_hpo(get_db(), query.q, query.limit))


@bp.get("/syndromes")
@operation({200: SyndromeMatches}, query=SearchQuery)
def syndrome_search():
    """Catalogue syndromes matching a name, OMIM/Orphanet ID or gene symbol"""
    from shared.catalog import search_syndromes

    query = parse(SearchQuery, request.args.to_dict())
    return jsonify(syndromes=search_syndromes(get_db(), query.q, query.limit))


@bp.post("/cases/<int:case_id>/images")
@operation({201: ImagesAccepted}, form=PhotoUpload, errors={
    400: "No photo attached, or a photo the portal cannot use (too small, say); the message names the file",
    413: "The body is over GESTALT_MAX_UPLOAD_MB, or a photo or the whole request is over its pixel, count or "
         "processing budget",
    415: "A file is not an image the portal reads"})
@limits.photos
def add_images(case_id: int):
    """Add photos; all are stored and queued, or none"""
    from web.uploads import receive_photos

    db = get_db()
    case = case_or_404(case_id)
    images = receive_photos(db, case, request.files.getlist("photo"), current_user.id, request.remote_addr)
    return jsonify(images=[{"id": i.id, "status": i.status} for i in images]), 201


@bp.get("/cases/<int:case_id>")
@operation({200: CasePayload}, query=CaseQuery)
def get_case(case_id: int):
    """A case with its photos, statuses and results"""
    db = get_db()
    case = case_or_404(case_id)
    poll = parse(CaseQuery, request.args.to_dict()).poll
    payload = _payload(db, case)
    # A poll (the case page's, every few seconds) is audited once per case and login; any other read every time.
    audit_read(db, "case_view", "case", case.id, once_per_login=poll, via="api", poll=poll)
    return jsonify(payload)


@bp.get("/cases/<int:case_id>/phenopacket")
@operation({200: Phenopacket})
def get_phenopacket(case_id: int):
    """The case as a GA4GH Phenopacket v2 (audited as an export)"""
    from shared.phenopackets import case_packet, packet_json

    db = get_db()
    case = case_or_404(case_id)
    audit(db, "phenopacket_export", current_user.id, "case", case.id, ip=request.remote_addr, via="api")
    db.commit()
    return current_app.response_class(packet_json(case_packet(db, case)), mimetype="application/json")


@bp.get("/images/<int:image_id>")
@operation({200: ImagePayload})
def get_image(image_id: int):
    """One photo's status, face and result"""
    db = get_db()
    image = image_or_404(image_id)
    from shared.modelops.versions import active_version

    active = active_version(db)
    payload = image_payload(db, image, active.id if active else None)
    audit_read(db, "image_view", "image", image.id, via="api")
    return jsonify(payload)


@bp.get("/images/<int:image_id>/aligned")
@operation({200: AlignedUrl}, errors={404: "No such photo, or not yours; or the photo has no aligned face yet"})
def aligned_face(image_id: int):
    """A short-lived presigned URL of the photo's aligned face, and nothing else"""
    from shared.modelops.crops import ensure_aligned_png
    from shared.storage import PRESIGN_SECONDS, get_storage

    db = get_db()
    image = image_or_404(image_id)
    if image.face is None or not image.face.aligned_key:
        return jsonify(error="this photo has no aligned face yet"), 404
    audit(db, "aligned_view", current_user.id, "image", image.id, ip=request.remote_addr, via="api")
    db.commit()
    storage = get_storage()
    if not ensure_aligned_png(storage, image.sha256, image.face.aligned_key):  # made on the first view
        return jsonify(error="this photo's aligned face is missing; re-score it"), 404
    return jsonify(url=storage.presigned_url(image.face.aligned_key), expires_in=PRESIGN_SECONDS)


@bp.route("/cases/<int:case_id>/diagnosis", methods=["POST", "PATCH"])
@operation({200: DiagnosisRecord}, body=DiagnosisUpdate, errors={
    400: "A field is malformed, the syndrome is not in the catalogue, or a first diagnosis names no syndrome"})
def put_diagnosis(case_id: int):
    """Record or update the confirmed diagnosis

    A field left out keeps its stored value (the first diagnosis of a case needs ``syndrome``);
    ``"consent": false`` withdraws consent, which is audited and ends the photos' use in training."""
    from shared.services.diagnoses import diagnosis_payload, set_diagnosis

    db = get_db()
    case = case_or_404(case_id)
    update = parse(DiagnosisUpdate, request.get_json(silent=True))
    set_diagnosis(db, case, update.model_dump(exclude_unset=True), current_user.id, request.remote_addr)
    return jsonify(diagnosis_payload(db, case))


@bp.post("/images/<int:image_id>/rescore")
@operation({202: ImageState}, errors={409: "The photo is still being processed, or was rejected"})
@limits.rescores
def rescore(image_id: int):
    """Score the photo again with the active model (its old result is kept)"""
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
@operation({201: PhotoImportResult, 200: PhotoImportResult, 400: ImportProblems}, form=PhotoImport, errors={
    413: "The archive is over GESTALT_IMPORT_MAX_ARCHIVE_MB, or checking its photos took more than "
         "GESTALT_IMPORT_CPU_SECONDS"})
@admin_required
@limits.imports
def import_photos():
    """A zip of <syndrome>/<patient>/<photo> folders as cases of ``owner`` (multipart: archive, owner, consent=yes,
    kind, labels): 201 with the cases created (200 when all were imported before), or 400 with every problem."""
    from shared.imports import ImportRefused
    from web.imports import import_archive, parse_import

    body = parse_import(request.form, request.files)
    try:
        result = import_archive(get_db(), body, current_user.id, request.remote_addr)
    except ImportRefused as exc:
        problems = ImportProblems(error=f"nothing was imported: {len(exc.problems)} problem(s)", problems=exc.problems)
        return jsonify(problems.model_dump()), 400
    return jsonify(result.model_dump()), 201 if result.cases else 200

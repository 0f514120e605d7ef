"""Clinician pages: case list, new case, case page with uploads and live results."""
from __future__ import annotations

from datetime import UTC, datetime

from flask import Blueprint, abort, flash, jsonify, redirect, render_template, request, url_for
from flask_login import current_user
from flask_wtf import FlaskForm
from sqlalchemy import select
from wtforms import DecimalField, SelectField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, NumberRange, Optional, Regexp, ValidationError

from shared.audit import audit
from shared.catalog import syndrome_summary
from shared.lifecycle import delete_case
from shared.models import Case, Syndrome
from shared.models.cases import ACTIVE_STATES
from shared.services import Refusal
from shared.services.cases import create_case, update_case
from shared.services.diagnoses import DiagnosisError, set_diagnosis
from shared.storage import get_storage
from web import limits
from web.access import case_or_404, visible_cases
from web.db import get_db
from web.errors import refuse, wants_json
from web.reads import audit_read
from web.results import case_payload
from web.schemas import AGE_MAX, ANCESTRY_MAX, PATIENT_REF_PATTERN, PATIENT_REF_RULE, SEXES
from web.uploads import receive_photos

bp = Blueprint("cases", __name__)

SEX_CHOICES = [(s, s.capitalize()) for s in sorted(SEXES, key=lambda s: s != "unknown")]  # "Unknown" first


class CaseForm(FlaskForm):
    """The case form; its rules are the API's (web.schemas), so a case is valid the same way by either door."""

    patient_ref = StringField("Pseudonymous patient ID", validators=[
        DataRequired(), Regexp(PATIENT_REF_PATTERN, message=f"must be {PATIENT_REF_RULE}")])
    sex = SelectField("Sex", choices=SEX_CHOICES, default="unknown")
    age_years = DecimalField("Age at photo (years)", places=1, validators=[Optional(), NumberRange(0, AGE_MAX)])
    ancestry = StringField("Ancestry (optional)", validators=[Optional(), Length(max=ANCESTRY_MAX)])
    hpo_terms = TextAreaField("HPO terms (optional)", validators=[Optional(), Length(max=20000)],
                              description="Type a feature or an ID (HP:0000316) and pick it from the list")

    def fields(self) -> dict:
        """The validated values, as the case services take them."""
        return {"patient_ref": self.patient_ref.data.strip(), "sex": self.sex.data,
                "age_years": float(self.age_years.data) if self.age_years.data is not None else None,
                "ancestry": (self.ancestry.data or "").strip() or None,
                "hpo_terms": getattr(self.hpo_terms, "ids", [])}

    def validate_hpo_terms(self, field) -> None:
        from shared.catalog import CatalogError, validate_hpo_terms

        try:
            field.ids = validate_hpo_terms(get_db(), field.data or "")
        except CatalogError as exc:
            raise ValidationError(str(exc)) from exc


SORTS = {"created": Case.created_at, "patient": Case.patient_ref, "age": Case.age_years, "sex": Case.sex}
STATUS_FILTERS = ("processing", "done", "rejected", "awaiting_model", "failed", "diagnosed", "undiagnosed")


@bp.get("/")
def index():
    """The case list: search by patient ID, filter by photo status or diagnosis, sort by any column."""
    from shared.models import Diagnosis, Image

    db = get_db()
    stmt = visible_cases()
    q = request.args.get("q", "").strip()
    if q:
        stmt = stmt.where(Case.patient_ref.ilike(f"%{q[:64]}%"))
    status = request.args.get("status", "")
    if status == "diagnosed":
        stmt = stmt.where(Case.id.in_(select(Diagnosis.case_id)))
    elif status == "undiagnosed":
        stmt = stmt.where(Case.id.not_in(select(Diagnosis.case_id)))
    elif status == "processing":
        stmt = stmt.where(Case.id.in_(select(Image.case_id).where(
            Image.status.in_(ACTIVE_STATES))))
    elif status in STATUS_FILTERS:
        stmt = stmt.where(Case.id.in_(select(Image.case_id).where(Image.status == status)))
    sort = request.args.get("sort", "created")
    column = SORTS.get(sort, Case.created_at)
    descending = request.args.get("dir", "desc" if sort == "created" else "asc") == "desc"
    stmt = stmt.order_by(column.desc().nulls_last() if descending else column.asc().nulls_last(), Case.id.desc())
    cases = db.scalars(stmt.limit(500)).all()
    audit_read(db, "case_list", None, None, q=q, status=status, cases=[c.id for c in cases])
    return render_template("cases.html", cases=cases, q=q, status=status, sort=sort, descending=descending,
                           statuses=STATUS_FILTERS)


@bp.get("/cases/<int:case_id>/report")
@limits.reports
def report(case_id: int):
    """A printable report (one or two A4 pages) for the clinic's records (audited as an export)."""
    from shared.models import ModelVersion
    from web import presentation

    db = get_db()
    case = case_or_404(case_id)
    audit(db, "report_export", current_user.id, "case", case.id, ip=request.remote_addr)
    db.commit()
    payload = case_payload(db, case, current_user.id, current_user.is_admin)
    # The case's ranking (shared.services.ranking: one model, the photos it scored), as the page shows it.
    result = payload["case_result"]
    version = db.get(ModelVersion, result["model_version"]["id"]) if result else None
    scored = [{"index": n, "scores": {r["syndrome_id"]: r["score"] for r in i["result"]["ranking"]}}
              for n, i in enumerate(payload["images"], 1) if result and i["id"] in result["image_ids"]]
    return render_template(
        "report.html", case=case, payload=payload, user=current_user, printed=datetime.now(UTC),
        ranking=result["ranking"] if result else [], ranking_photos=(result or {}).get("photos", 1), scored=scored,
        model={"name": version.name, "classes": len(version.classes)} if version else None,
        validation=presentation.validation_summary(version), disclaimer=presentation.DISCLAIMER,
        status_label=presentation.status_label, band=presentation.similarity_band)


@bp.get("/cases/<int:case_id>/phenopacket.json")
def phenopacket(case_id: int):
    """The case as a GA4GH Phenopacket v2 (a download; audited as an export)."""
    from flask import Response

    from shared.phenopackets import case_packet, file_name, packet_json

    db = get_db()
    case = case_or_404(case_id)
    audit(db, "phenopacket_export", current_user.id, "case", case.id, ip=request.remote_addr)
    db.commit()
    return Response(packet_json(case_packet(db, case)), mimetype="application/json", headers={
        "Content-Disposition": f'attachment; filename="{file_name(case)}.json"'})


@bp.route("/cases/new", methods=["GET", "POST"])
def new_case():
    form = CaseForm()
    if form.validate_on_submit():
        case = create_case(get_db(), current_user.id, form.fields(), request.remote_addr)
        return redirect(url_for("cases.show", case_id=case.id))
    return render_template("case_new.html", form=form), 200 if request.method == "GET" else 400


@bp.route("/cases/<int:case_id>/edit", methods=["GET", "POST"])
def edit_case(case_id: int):
    """Correct a case's details (audited: which fields changed)."""
    from shared.catalog import hpo_labels

    db = get_db()
    case = case_or_404(case_id)
    terms = "\n".join(f"{t['id']} {t['name']}" for t in hpo_labels(db, list(case.hpo_terms or [])))
    form = CaseForm(data={"patient_ref": case.patient_ref, "sex": case.sex, "age_years": case.age_years,
                          "ancestry": case.ancestry or "", "hpo_terms": terms})
    if form.validate_on_submit():
        changed = update_case(db, case, form.fields(), current_user.id, request.remote_addr)
        flash(f"Saved: {', '.join(c.replace('_', ' ') for c in changed)}." if changed else "Nothing changed.", "info")
        return redirect(url_for("cases.show", case_id=case.id), 303)
    audit_read(db, "case_edit_view", "case", case.id)
    return render_template("case_new.html", form=form, case=case), 200 if request.method == "GET" else 400


@bp.get("/cases/<int:case_id>")
def show(case_id: int):
    db = get_db()
    case = case_or_404(case_id)
    audit(db, "case_view", current_user.id, "case", case.id, ip=request.remote_addr)
    db.commit()
    payload = case_payload(db, case, current_user.id, current_user.is_admin)
    current = db.get(Syndrome, case.diagnosis.syndrome_id) if case.diagnosis else None
    return render_template("case.html", case=case, payload=payload,
                           current_syndrome=syndrome_summary(current) if current else None)


@bp.post("/cases/<int:case_id>/images")
@limits.photos
def upload(case_id: int):
    """Accept one or more photos (field ``photo``); all are stored or none."""
    db = get_db()
    case = case_or_404(case_id)
    try:
        images = receive_photos(db, case, request.files.getlist("photo"), current_user.id, request.remote_addr)
    except Refusal as exc:
        return refuse(exc.message, exc.status, flash_it=True)
    if wants_json():
        return jsonify(images=[{"id": i.id, "status": i.status} for i in images]), 201
    flash(f"{len(images)} photo(s) uploaded.", "info")
    return redirect(url_for("cases.show", case_id=case.id), 303)


@bp.get("/images/<int:image_id>/aligned.png")
def aligned_png(image_id: int):
    """The aligned face, through the portal (logged in, owner or admin, audited)."""
    from flask import Response

    from shared.modelops.crops import aligned_face_png
    from web.access import image_or_404

    db = get_db()
    image = image_or_404(image_id)
    if image.face is None or not image.face.aligned_key:
        abort(404)
    audit(db, "aligned_view", current_user.id, "image", image.id, ip=request.remote_addr)
    db.commit()
    png = aligned_face_png(get_storage(), image.sha256, image.face.aligned_key)
    if png is None:
        abort(404)
    return Response(png, mimetype="image/png", headers={"Cache-Control": "private, no-store"})


@bp.post("/cases/<int:case_id>/diagnosis")
def diagnose(case_id: int):
    """The confirmed diagnosis from the case page's form."""
    db = get_db()
    case = case_or_404(case_id)
    try:
        # The form always shows every stored value, so every field it sends is meant; an unticked box withdraws.
        set_diagnosis(db, case, {"syndrome": request.form.get("syndrome", ""), "kind": request.form.get("kind"),
                                 "gene": request.form.get("gene", ""), "variant": request.form.get("variant", ""),
                                 "consent": request.form.get("consent") == "yes"},
                      current_user.id, request.remote_addr)
        flash("Diagnosis recorded.", "diagnosis")
    except DiagnosisError as exc:
        flash(exc.message, "error")
    return redirect(url_for("cases.show", case_id=case.id, _anchor="diagnosis"), 303)


@bp.post("/cases/<int:case_id>/delete")
def delete(case_id: int):
    """Delete the case, its photos and every derived record and object (audited)."""
    db = get_db()
    case = case_or_404(case_id)
    delete_case(db, get_storage(), case, current_user.id, "deleted by user", request.remote_addr)
    flash(f"Case {case.patient_ref} and its photos were deleted.", "info")
    return redirect(url_for("cases.index"), 303)


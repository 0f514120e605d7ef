"""The JSON shape of a case and its results, shared by the portal page and the API."""
from __future__ import annotations

import numpy as np
from flask import url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Case, Image, ModelVersion, RegionScore, Syndrome
from shared.services.diagnoses import diagnosis_payload
from shared.services.ranking import case_ranking, photo_result
from web.phenotype import phenotype_payload, request_gallery

TOP_N = 30


def image_payload(db: Session, image: Image, active_id: int | None, model_id: int | None = None) -> dict:
    """A photo's status, face and result: the result of model ``model_id`` (the case ranking's; default: the
    active one) when it scored the photo, else the newest."""
    out = {
        "id": image.id, "status": image.status, "reason": image.reason,
        "width": image.width, "height": image.height,
        "uploaded_at": image.created_at.isoformat(), "updated_at": image.updated_at.isoformat(),
        "result": None, "face": None,
    }
    result = photo_result(db, image.id, model_id if model_id is not None else active_id)
    version = db.get(ModelVersion, result.model_version_id) if result is not None else None
    face = image.face
    if face is not None and face.aligned_key and face.landmarks and face.transform:
        out["face"] = face_payload(image, face, version)
    if result is not None:
        regions = db.scalars(select(RegionScore).where(RegionScore.image_id == image.id,
                                                       RegionScore.model_version_id == result.model_version_id)
                             .order_by(RegionScore.region)).all()
        top = result.ranking[:TOP_N]
        index = {c["syndrome_id"]: i for i, c in enumerate(version.classes)}
        out["result"] = {
            "model_version": {"id": version.id, "name": version.name},
            "outdated": active_id is not None and active_id != version.id,
            "ranking": with_catalogue(db, top),
            # Per member (a region, or the identity encoder), the score of each syndrome in the top list.
            "regions": {r.region: {str(t["syndrome_id"]): r.scores[index[t["syndrome_id"]]]
                                   for t in top} for r in regions},
            # Each member's share of the aggregate (0: scored and kept, but deciding nothing).
            "weights": (version.config or {}).get("weights") or {},
            # How unlike the model's training photos this photo is (None for a model without descriptors).
            "ood": result.ood,
        }
    return out


def face_payload(image: Image, face, version: ModelVersion | None) -> dict:
    """The aligned face, its landmarks on the canvas and the region boxes, as the model that scored the photo was
    fitted on them (its preprocessing contract; the current one for a photo not scored yet)."""
    contract = ((version.config or {}).get("contract") if version is not None else None) or _current_contract()
    shown = (version.config or {}).get("regions") if version is not None else None
    m = np.asarray(face.transform)
    canvas = np.asarray(face.landmarks) @ m[:, :2].T + m[:, 2]
    return {"aligned_url": url_for("cases.aligned_png", image_id=image.id), "size": contract["canvas"],
            "regions": {name: list(box) for name, box in contract["regions"].items()
                        if name in (shown or contract["default_regions"])},
            "landmarks": np.round(canvas, 1).tolist(), "faces_found": face.faces_found,
            "rotation": round(face.rotation or 0.0, 1), "measurements": face.measurements,
            "quality": face.quality, "detector": face.detector, "landmarker": face.landmarker,
            # Scored but less reliable (e.g. "turned face: less reliable"), in words.
            "flags": _flags(face.quality)}


def _flags(quality: dict | None) -> list[str]:
    from shared.ml.preprocess.quality import FLAG_TEXT

    return [FLAG_TEXT.get(f, f) for f in (quality or {}).get("flags", [])]


def _current_contract() -> dict:
    from shared.ml.members.model import preprocessing_contract  # OpenCV: loaded by the first page that shows a face

    return preprocessing_contract()


def with_catalogue(db: Session, ranking: list[dict]) -> list[dict]:
    """Ranking entries with each syndrome's OMIM/Orphanet IDs and genes from the catalogue."""
    ids = [r["syndrome_id"] for r in ranking]
    rows = {s.id: s for s in db.scalars(select(Syndrome).where(Syndrome.id.in_(ids)))} if ids else {}
    out = []
    for r in ranking:
        s = rows.get(r["syndrome_id"])
        out.append({**r, "omim": s.omim if s else None, "orpha": s.orpha if s else None,
                    "genes": list(s.genes or []) if s else []})
    return out


def gallery_payload(db: Session, case: Case, active: ModelVersion | None, viewer_id: int | None,
                    viewer_is_admin: bool = False) -> dict | None:
    """Similar diagnosed patients (consented) and syndromes ranked by their nearest patients.

    Other clinicians' patients appear as a diagnosis and a similarity only: no photo, no patient
    ID, no case ID; those who are the case's own person are left out and counted (``withheld``). The viewer's own
    cases carry a link (every case, for an admin).
    """
    from shared.modelops.gallery import case_features, gallery_space
    from shared.modelops.same_person import withhold_same_person

    if active is None:
        return None
    space = gallery_space(active.config)
    if not space:
        return None
    query = case_features(db, case.id, space)
    if len(query) == 0:
        return None
    gallery, withheld = withhold_same_person(db, request_gallery(db, space), case.id, viewer_id, active.config)
    match = gallery.match(query, exclude_case=case.id, syndromes=TOP_N)

    patients = []
    for p in match["patients"]:
        case_id = p.pop("case_id")
        entry = {**p, "own": viewer_id is not None and gallery.owners.get(case_id) == viewer_id}
        if entry["own"] or viewer_is_admin:  # a link only where the viewer may open the case anyway
            entry["case_url"] = url_for("cases.show", case_id=case_id)
        patients.append(entry)
    syndromes = [{k: v for k, v in s.items() if k != "nearest_case_id"} for s in match["syndromes"]]
    return {"model_version": {"id": active.id, "name": active.name}, "photos": int(len(query)),
            "gallery_patients": match["gallery_patients"], "patients": patients, "syndromes": syndromes,
            "gallery_syndromes": len(set(gallery.syndrome_ids.tolist())), "withheld": withheld,
            # How unlike the gallery's patients the case's photos are (the out-of-distribution score of a clinic
            # whose model has no training photos of its own: the gallery's).
            "ood": gallery.unusual(query, exclude_case=case.id)}


def gallery_ranking(result: dict, gallery: dict | None) -> None:
    """A case scored by the gallery model alone (no trained model yet): its ranking is the gallery's syndromes by
    their nearest diagnosed patient, and it says so (``gallery_only``: how many patients of how many syndromes)."""
    syndromes = (gallery or {}).get("syndromes") or []
    result["ranking"] = [{"rank": i + 1, "syndrome_id": s["syndrome_id"], "name": s["name"], "score": s["similarity"],
                          "omim": s["omim"], "orpha": s["orpha"], "genes": s["genes"]}
                         for i, s in enumerate(syndromes)]
    result["gallery_only"] = {"patients": (gallery or {}).get("gallery_patients", 0),
                              "syndromes": (gallery or {}).get("gallery_syndromes", 0)}


def display_fields(db: Session, result: dict | None, active: ModelVersion | None) -> dict:
    """What a person reads instead of internal names, and how the ranking's model was validated."""
    from web import presentation

    version = db.get(ModelVersion, result["model_version"]["id"]) if result else active
    return {"regions": presentation.REGION_LABELS, "statuses": presentation.STATUS_LABELS,
            "status_hints": presentation.STATUS_HINTS, "disclaimer": presentation.DISCLAIMER,
            "model": {"name": version.name, "classes": len(version.classes),
                      "validation": presentation.validation_summary(version)} if version else None}


def case_payload(db: Session, case: Case, viewer_id: int | None = None, viewer_is_admin: bool = False) -> dict:
    from shared.catalog import hpo_labels
    from shared.modelops.versions import active_version, is_gallery

    active = active_version(db)
    active_id = active.id if active else None
    ranking = case_ranking(db, case.id, active_id)
    result = ranking.payload(TOP_N) if ranking is not None else None
    if result is not None:
        result["ranking"] = with_catalogue(db, result["ranking"])
    gallery = gallery_payload(db, case, active, viewer_id, viewer_is_admin)
    if ranking is not None and is_gallery(ranking.version):
        gallery_ranking(result, gallery)
    return {
        "id": case.id, "patient_ref": case.patient_ref, "sex": case.sex, "age_years": case.age_years,
        "ancestry": case.ancestry, "hpo_terms": hpo_labels(db, list(case.hpo_terms or [])),
        "created_at": case.created_at.isoformat(),
        "active_model": {"id": active.id, "name": active.name} if active else None,
        "images": [image_payload(db, image, active_id, ranking.version.id if ranking else None)
                   for image in case.images],
        "case_result": result,
        "diagnosis": diagnosis_payload(db, case),
        "gallery": gallery,
        "display": display_fields(db, result, active),
        "phenotype": phenotype_payload(db, case, active_id, ranking),
    }

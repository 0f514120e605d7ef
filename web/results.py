"""The JSON shape of a case and its results, shared by the portal page and the API."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.ml.registry import active_version
from shared.models import Case, Image, ModelVersion, RegionScore, Result
from web.diagnoses import diagnosis_payload

TOP_N = 30


def image_payload(db: Session, image: Image, active_id: int | None) -> dict:
    out = {
        "id": image.id, "status": image.status, "reason": image.reason,
        "width": image.width, "height": image.height,
        "uploaded_at": image.created_at.isoformat(), "updated_at": image.updated_at.isoformat(),
        "result": None,
    }
    result = db.scalars(select(Result).where(Result.image_id == image.id)
                        .order_by(Result.created_at.desc(), Result.id.desc())).first()
    if result is not None:
        version = db.get(ModelVersion, result.model_version_id)
        regions = db.scalars(select(RegionScore).where(RegionScore.image_id == image.id,
                                                       RegionScore.model_version_id == result.model_version_id)
                             .order_by(RegionScore.region)).all()
        top = result.ranking[:TOP_N]
        index = {c["syndrome_id"]: i for i, c in enumerate(version.classes)}
        out["result"] = {
            "model_version": {"id": version.id, "name": version.name},
            "outdated": active_id is not None and active_id != version.id,
            "ranking": top,
            # Per region, the score of each syndrome in the top list.
            "regions": {r.region: {str(t["syndrome_id"]): r.scores[index[t["syndrome_id"]]]
                                   for t in top} for r in regions},
        }
    return out


def case_payload(db: Session, case: Case) -> dict:
    active = active_version(db)
    return {
        "id": case.id, "patient_ref": case.patient_ref, "sex": case.sex, "age_years": case.age_years,
        "created_at": case.created_at.isoformat(),
        "active_model": {"id": active.id, "name": active.name} if active else None,
        "images": [image_payload(db, image, active.id if active else None) for image in case.images],
        "diagnosis": diagnosis_payload(db, case),
    }

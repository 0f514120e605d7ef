"""A case's ranking by the face: which model, which photos, and the mean of their scores.

One rule for everything that shows a case: the case page and its printed report, the API, and the joint
face-and-phenotype ranking (``shared.services.phenotype``). The ranking comes from one model, never a mix:
the active model when it has scored at least one of the case's finished photos, else the model that
scored most of them (the newest of those on a tie). Only finished (``done``) photos count, each with
its result from that model; the photos scored only by another model are counted as left out, so the
page can say so. A photo's own card shows the result of the ranking's model when it scored the photo
(else the photo's newest result), so the card and its column in the case ranking agree.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.ml.formats.ranking import rank
from shared.models import Image, ImageStatus, ModelVersion, Result


@dataclass(frozen=True)
class CaseRanking:
    """The case's ranking: ``version`` scored the photos ``image_ids``; ``scores`` is the mean of their
    aggregate scores, in the model's class order. ``left_out``: finished photos without a result from it."""

    version: ModelVersion
    image_ids: tuple[int, ...]
    scores: np.ndarray
    left_out: int

    @property
    def photos(self) -> int:
        return len(self.image_ids)

    def ranking(self, top: int | None = None) -> list[dict]:
        """The model's classes best first (``{"rank", "syndrome_id", "name", "score"}``), the first ``top``."""
        return rank(self.scores, self.version.classes)[:top]

    def payload(self, top: int | None = None) -> dict:
        """What the page, the report and the API show: the model, the photos behind the ranking, the ranking."""
        return {"model_version": {"id": self.version.id, "name": self.version.name}, "photos": self.photos,
                "image_ids": list(self.image_ids), "left_out": self.left_out, "ranking": self.ranking(top)}


def choose_model(counts: dict[int, int], active_id: int | None) -> int | None:
    """The model a ranking uses, from ``{model version id: photos it scored}``: the active one when it scored any,
    else the one that scored most (the newest, highest id, on a tie); None without any."""
    if active_id is not None and counts.get(active_id):
        return active_id
    return max(counts, key=lambda v: (counts[v], v)) if counts else None


def case_ranking(db: Session, case_id: int, active_id: int | None) -> CaseRanking | None:
    """The case's ranking (see the module's rule); None while none of its finished photos has a result."""
    rows = db.execute(select(Result.image_id, Result.model_version_id, Result.scores)
                      .join(Image, Image.id == Result.image_id)
                      .where(Image.case_id == case_id, Image.status == ImageStatus.done.value)
                      .order_by(Result.image_id)).all()
    counts: dict[int, int] = {}
    for _, version_id, _ in rows:
        counts[version_id] = counts.get(version_id, 0) + 1
    chosen = choose_model(counts, active_id)
    if chosen is None:
        return None
    used = [(image_id, scores) for image_id, version_id, scores in rows if version_id == chosen]
    finished = {image_id for image_id, _, _ in rows}
    mean = np.mean(np.asarray([s for _, s in used], dtype=np.float64), axis=0)
    return CaseRanking(version=db.get(ModelVersion, chosen), image_ids=tuple(i for i, _ in used), scores=mean,
                       left_out=len(finished) - len(used))


def photo_result(db: Session, image_id: int, model_id: int | None) -> Result | None:
    """The result a photo's card shows: model ``model_id``'s (the case ranking's, else the active one) when it
    scored the photo, else the newest."""
    results = db.scalars(select(Result).where(Result.image_id == image_id)
                         .order_by(Result.created_at.desc(), Result.id.desc())).all()
    return next((r for r in results if r.model_version_id == model_id), results[0] if results else None)

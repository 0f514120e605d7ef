"""Loading the gallery of diagnosed, consented photos from the database (the maths is :mod:`shared.ml.members.gallery`).

A photo's vectors come from its cached features (``image_features``): the identity encoder's
descriptor, or the regional features under the active model's backbone (:func:`gallery_space`);
see :mod:`shared.ml.members.gallery` for how photos, patients and syndromes are ranked.
"""
from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.ml.formats.vectors import unpack
from shared.ml.members.gallery import Gallery, gallery_vectors
from shared.models import Case, Diagnosis, Image, ImageFeature, Syndrome

# Unit vectors per (backbone, regions) and image id. Features of one backbone never change, so each
# process reads a photo's features once; the rows of who is in the gallery are read every time.
_VECTORS: dict[tuple[str, tuple[str, ...]], dict[int, np.ndarray]] = {}


def gallery_space(config: dict | None) -> tuple[str | None, tuple[str, ...]]:
    """The features a model version's gallery matches on: ``(backbone sha, regions)``.

    A model with an identity member matches on the identity encoder's descriptors (GestaltMatcher's
    approach: a representation learned on millions of faces, the same for every model version, so
    the gallery does not change when the regional networks are retrained); otherwise on the regional
    networks' features under the model's backbone.
    """
    from shared.ml.members.identity import MEMBER

    config = config or {}
    identity = (config.get("members") or {}).get(MEMBER) or {}
    if identity.get("encoder_sha"):
        return identity.get("feature_key") or identity["encoder_sha"], (MEMBER,)
    return config.get("backbone_sha"), tuple(config.get("regions") or ())


def load_gallery(session: Session, backbone_sha: str, regions: tuple[str, ...] | list[str]) -> Gallery:
    """The gallery for one backbone: scored photos of diagnosed cases with consent, with every region cached."""
    regions = tuple(regions)
    members = session.execute(
        select(Image.id, Image.case_id, Diagnosis.syndrome_id, Case.owner_id)
        .join(Case, Case.id == Image.case_id).join(Diagnosis, Diagnosis.case_id == Case.id)
        .where(Diagnosis.consent.is_(True), Image.status == "done").order_by(Image.id)).all()
    meta = {image_id: (case_id, syndrome_id, owner_id) for image_id, case_id, syndrome_id, owner_id in members}
    cache = _VECTORS.setdefault((backbone_sha, regions), {})
    if len(_VECTORS) > 4:  # models are few; drop the oldest backbones' vectors
        for key in list(_VECTORS)[:-4]:
            del _VECTORS[key]
    missing = [i for i in meta if i not in cache]
    for start in range(0, len(missing), 5000):
        per_image: dict[int, dict] = {}
        for image_id, region, blob in session.execute(
                select(ImageFeature.image_id, ImageFeature.region, ImageFeature.vector)
                .where(ImageFeature.backbone_sha == backbone_sha, ImageFeature.region.in_(regions),
                       ImageFeature.image_id.in_(missing[start:start + 5000]))):
            per_image.setdefault(image_id, {})[region] = unpack(blob)
        full = [i for i, v in per_image.items() if set(v) == set(regions)]
        if full:
            vectors = gallery_vectors(np.stack([np.stack([per_image[i][r] for r in regions]) for i in full]))
            cache.update(zip(full, vectors, strict=True))
    ids = [i for i in meta if i in cache]
    vectors = np.stack([cache[i] for i in ids]) if ids else np.zeros((0, 0), np.float32)
    syndrome_ids = sorted({meta[i][1] for i in ids})
    syndromes = {s.id: {"name": s.name, "omim": s.omim, "orpha": s.orpha, "genes": list(s.genes or [])}
                 for s in session.scalars(select(Syndrome).where(Syndrome.id.in_(syndrome_ids)))} if ids else {}
    return Gallery(backbone_sha, regions, vectors, np.array(ids, dtype=np.int64),
                   np.array([meta[i][0] for i in ids], dtype=np.int64),
                   np.array([meta[i][1] for i in ids], dtype=np.int64), syndromes,
                   {meta[i][0]: meta[i][2] for i in ids})


def case_features(session: Session, case_id: int, backbone_sha: str, regions: tuple[str, ...]) -> np.ndarray:
    """Cached features ``P x R x F`` of a case's scored photos under ``backbone_sha`` (P may be 0)."""
    rows = session.execute(
        select(ImageFeature.image_id, ImageFeature.region, ImageFeature.vector)
        .join(Image, Image.id == ImageFeature.image_id)
        .where(Image.case_id == case_id, Image.status == "done", ImageFeature.backbone_sha == backbone_sha,
               ImageFeature.region.in_(regions)).order_by(ImageFeature.image_id)).all()
    per_image: dict[int, dict] = {}
    for image_id, region, blob in rows:
        per_image.setdefault(image_id, {})[region] = unpack(blob)
    full = [np.stack([v[r] for r in regions]) for v in per_image.values() if set(v) == set(regions)]
    return np.stack(full) if full else np.zeros((0, len(regions), 0), np.float32)

"""Loading the gallery of diagnosed, consented photos from the database (the maths is :mod:`shared.ml.members.gallery`).

A photo's gallery vector comes from its cached features (``image_features``) in the active model's gallery space
(:func:`gallery_space`): the identity encoder's descriptor of the face chip, with the encoder's features of the
region cuts where validation chose them, or a CASIA-only model's regional features; see
:mod:`shared.ml.members.gallery` for how photos, patients and syndromes are ranked.
"""
from __future__ import annotations

import numpy as np
from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from shared.ml.formats.vectors import unpack
from shared.ml.members.gallery import Gallery, unit_concat
from shared.models import Case, Diagnosis, Image, ImageFeature, Syndrome

# A gallery space: the (name, feature key) pairs a photo's vector is made of, in order.
Space = tuple[tuple[str, str], ...]
# Unit vectors per space and image id. Features under one key never change, so each process reads a photo's
# features once; the rows of who is in the gallery are read every time.
_VECTORS: dict[Space, dict[int, np.ndarray]] = {}


def gallery_space(config: dict | None) -> Space:
    """The features a model version's gallery matches on: ``((name, feature key), ...)``, empty for none.

    A model that keeps the identity encoder's outputs matches on them (GestaltMatcher's approach: a representation
    learned on millions of faces, the same for every model version, so the gallery does not change when heads are
    retrained): the face chip's descriptor, with the region cuts' features where validation chose them
    (``config["descriptors"]``). A model of CASIA-Nets alone matches on their features under their backbone.
    """
    from shared.ml.members.identity import MEMBER

    config = config or {}
    described = config.get("descriptors") or {}
    keys = described.get("keys") or {}
    if described.get("gallery") and (keys or described.get("feature_key")):
        return tuple((n, keys.get(n) or described["feature_key"]) for n in described["gallery"])
    members = config.get("members") or {}
    identity = members.get(MEMBER) or {}
    if identity.get("encoder_sha"):  # a version registered before descriptors were named (checkpoint format 1)
        return ((MEMBER, identity.get("feature_key") or identity["encoder_sha"]),)
    casia = members.get("casia") or {}
    key = casia.get("feature_key") or config.get("backbone_sha")
    names = casia.get("names") or config.get("regions") or ()
    return tuple((n, key) for n in names) if key else ()


def _vectors(session: Session, space: Space, image_ids: list[int]) -> dict[int, np.ndarray]:
    """The unit vectors of the photos that have every feature of ``space``."""
    per_image: dict[int, dict[tuple[str, str], np.ndarray]] = {}
    match = or_(*(and_(ImageFeature.region == n, ImageFeature.backbone_sha == k) for n, k in space))
    for image_id, name, key, blob in session.execute(
            select(ImageFeature.image_id, ImageFeature.region, ImageFeature.backbone_sha, ImageFeature.vector)
            .where(match, ImageFeature.image_id.in_(image_ids))):
        per_image.setdefault(image_id, {})[(name, key)] = unpack(blob)
    full = [i for i, v in per_image.items() if all(part in v for part in space)]
    if not full:
        return {}
    vectors = unit_concat([np.stack([per_image[i][part] for i in full]) for part in space])
    return dict(zip(full, vectors, strict=True))


def load_gallery(session: Session, space: Space) -> Gallery:
    """The gallery in one space: scored photos of diagnosed cases with consent, with every feature cached."""
    members = session.execute(
        select(Image.id, Image.case_id, Diagnosis.syndrome_id, Case.owner_id)
        .join(Case, Case.id == Image.case_id).join(Diagnosis, Diagnosis.case_id == Case.id)
        .where(Diagnosis.consent.is_(True), Image.status == "done").order_by(Image.id)).all()
    meta = {image_id: (case_id, syndrome_id, owner_id) for image_id, case_id, syndrome_id, owner_id in members}
    cache = _VECTORS.setdefault(space, {})
    if len(_VECTORS) > 4:  # models are few; drop the oldest spaces' vectors
        for key in list(_VECTORS)[:-4]:
            del _VECTORS[key]
    missing = [i for i in meta if i not in cache]
    for start in range(0, len(missing), 5000):
        cache.update(_vectors(session, space, missing[start:start + 5000]))
    ids = [i for i in meta if i in cache]
    vectors = np.stack([cache[i] for i in ids]) if ids else np.zeros((0, 0), np.float32)
    syndrome_ids = sorted({meta[i][1] for i in ids})
    syndromes = {s.id: {"name": s.name, "omim": s.omim, "orpha": s.orpha, "genes": list(s.genes or [])}
                 for s in session.scalars(select(Syndrome).where(Syndrome.id.in_(syndrome_ids)))} if ids else {}
    return Gallery(space, vectors, np.array(ids, dtype=np.int64),
                   np.array([meta[i][0] for i in ids], dtype=np.int64),
                   np.array([meta[i][1] for i in ids], dtype=np.int64), syndromes,
                   {meta[i][0]: meta[i][2] for i in ids})


def case_features(session: Session, case_id: int, space: Space) -> np.ndarray:
    """The unit vectors ``P x D`` of a case's scored photos in ``space`` (P may be 0)."""
    ids = list(session.scalars(select(Image.id).where(Image.case_id == case_id, Image.status == "done")
                               .order_by(Image.id)))
    vectors = _vectors(session, space, ids) if ids and space else {}
    return np.stack([vectors[i] for i in ids if i in vectors]) if vectors else np.zeros((0, 0), np.float32)

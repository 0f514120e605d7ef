"""A gallery that does not re-identify: other clinicians' patients who are the query's person are withheld.

Without this, a clinician who uploads a photo of someone in another clinician's consented gallery learns
that the person is a patient here, and with what diagnosis (the same face matches at a similarity near 1).
Patients of other owners whose photos lie within the identity encoder's same-person distance of any of the
case's photos (:func:`shared.ml.formats.reidentification.same_person`, on the descriptors stored as features under
the identity member's ``feature_key``) are left out of what the viewer is shown; the viewer's own patients
stay. When the case's photos have no descriptor (a model without the identity member scored them), the same
person cannot be ruled out, and every other owner's patient is left out.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.ml.formats.reidentification import same_person
from shared.ml.formats.vectors import unpack
from shared.ml.members.gallery import Gallery
from shared.models import Image, ImageFeature

# Descriptors per feature key and image id; a photo's descriptor never changes under one key.
_DESCRIPTORS: dict[str, dict[int, np.ndarray]] = {}


def identity_key(config: dict | None) -> str | None:
    """Where a model version keeps the face chip's encoder descriptor (``image_features.backbone_sha``), or None."""
    from shared.ml.members.identity import MEMBER

    described = (config or {}).get("descriptors") or {}
    if described.get("feature_key") and MEMBER in (described.get("names") or ()):
        return described["feature_key"]
    identity = ((config or {}).get("members") or {}).get(MEMBER) or {}
    return identity.get("feature_key") or identity.get("encoder_sha") or None


def withhold_same_person(session: Session, gallery: Gallery, case_id: int, viewer_id: int | None,
                         config: dict | None) -> tuple[Gallery, int]:
    """``gallery`` without the patients of owners other than ``viewer_id`` who are case ``case_id``'s person (under
    the identity member of the model ``config``), and how many patients were left out."""
    others = {case for case, owner in gallery.owners.items() if owner != viewer_id and case != case_id}
    if not others:
        return gallery, 0
    key = identity_key(config)
    query = _case_descriptors(session, case_id, key) if key else np.zeros((0, 0))
    withheld = set(others)
    if len(query):
        ids = [int(i) for i, c in zip(gallery.image_ids, gallery.case_ids, strict=True) if int(c) in others]
        known = _descriptors(session, key, ids)
        usable = [i for i in ids if i in known]
        case_of = dict(zip(gallery.image_ids.tolist(), gallery.case_ids.tolist(), strict=True))
        same = same_person(query, np.stack([known[i] for i in usable])) if usable else np.zeros(0, bool)
        # A patient stays when none of their photos is the same person (and every photo has a descriptor).
        missing = {case_of[i] for i in ids if i not in known}
        withheld = {case_of[i] for i, s in zip(usable, same, strict=True) if s} | missing
    if not withheld:
        return gallery, 0
    keep = ~np.isin(gallery.case_ids, sorted(withheld))
    return dataclasses.replace(
        gallery, vectors=gallery.vectors[keep], image_ids=gallery.image_ids[keep], case_ids=gallery.case_ids[keep],
        syndrome_ids=gallery.syndrome_ids[keep],
        owners={c: o for c, o in gallery.owners.items() if c not in withheld}), len(withheld)


def _case_descriptors(session: Session, case_id: int, key: str) -> np.ndarray:
    from shared.ml.members.identity import MEMBER

    rows = session.scalars(select(ImageFeature.vector).join(Image, Image.id == ImageFeature.image_id).where(
        Image.case_id == case_id, ImageFeature.backbone_sha == key, ImageFeature.region == MEMBER)).all()
    return np.stack([unpack(v) for v in rows]) if rows else np.zeros((0, 0))


def _descriptors(session: Session, key: str, image_ids: list[int]) -> dict[int, np.ndarray]:
    from shared.ml.members.identity import MEMBER

    cache = _DESCRIPTORS.setdefault(key, {})
    missing = [i for i in image_ids if i not in cache]
    for start in range(0, len(missing), 5000):
        for image_id, blob in session.execute(select(ImageFeature.image_id, ImageFeature.vector).where(
                ImageFeature.backbone_sha == key, ImageFeature.region == MEMBER,
                ImageFeature.image_id.in_(missing[start:start + 5000]))):
            cache[image_id] = unpack(blob)
    return {i: cache[i] for i in image_ids if i in cache}

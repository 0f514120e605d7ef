"""The feature store: pooled backbone features of scored photos, one row per (photo, region, backbone).

Scoring stores a photo's features (:func:`store_features`); the gallery and retraining read them,
and retraining computes the missing ones from the stored crops (:func:`cached_features`).
"""
from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import upsert
from shared.ml.formats.vectors import pack, unpack
from shared.ml.train import heads as hd
from shared.modelops.crops import crop_keys, load_crops, region_stack
from shared.models import ImageFeature
from shared.storage import Storage


def feature_rows(image_id: int, regions: tuple[str, ...], backbone: str, features: np.ndarray) -> list[dict]:
    """The feature store's rows of one photo: one per region, for ``backbone``."""
    return [{"image_id": image_id, "region": r, "backbone_sha": backbone, "vector": pack(features[i])}
            for i, r in enumerate(regions)]


_UPSERT = upsert(ImageFeature, ["image_id", "region", "backbone_sha"], ["vector"])


def store_feature_rows(session: Session, rows: list[dict]) -> None:
    """Upsert rows of :func:`feature_rows` (any photos, any backbones) in one statement."""
    if rows:
        session.execute(_UPSERT, rows)


def store_features(session: Session, image_id: int, regions: tuple[str, ...], backbone: str,
                   features: np.ndarray) -> None:
    """Upsert one cached feature row per region for ``backbone``."""
    store_feature_rows(session, feature_rows(image_id, regions, backbone, features))


def cached_features(session: Session, storage: Storage, model, backbone: str, image_ids: list[int]) -> tuple[dict, int]:
    """Cached features per image id, computing (and caching) the missing ones from the stored crops."""
    regions = list(model.regions)
    cached: dict[int, dict[str, np.ndarray]] = {}
    for f in session.scalars(select(ImageFeature).where(ImageFeature.backbone_sha == backbone,
                                                        ImageFeature.image_id.in_(image_ids))):
        cached.setdefault(f.image_id, {})[f.region] = unpack(f.vector)
    missing = [i for i in image_ids if set(cached.get(i, {})) != set(regions)]
    if missing:
        crops = crop_keys(session, missing)
        usable = [i for i in missing if all(r in crops.get(i, {}) for r in regions)]
        stack = np.stack([region_stack(storage, crops[i], regions)
                          for i in usable]) if usable else np.zeros((0, len(regions), 100, 100), np.uint8)
        feats = hd.extract_features(model, stack)
        for i, image_id in enumerate(usable):
            store_features(session, image_id, tuple(regions), backbone, feats[i])
            cached[image_id] = {r: feats[i, j] for j, r in enumerate(regions)}
    out = {i: np.stack([v[r] for r in regions]) for i, v in cached.items() if set(v) == set(regions)}
    return out, len(missing)


def cached_descriptors(session: Session, storage: Storage, member, image_ids: list[int],
                       device: str = "cpu") -> tuple[dict[int, np.ndarray], int]:
    """The identity encoder's descriptor per image id, as ``member`` (an IdentityMember) computes it,
    computing (and caching) the missing ones from the stored face chips; photos aligned before chips
    were kept have none (their alignment re-runs on a re-score). Returns the descriptors and how many
    were computed."""
    from shared.ml.members.identity import CHIP_REGION, MEMBER

    out = {f.image_id: unpack(f.vector) for f in session.scalars(
        select(ImageFeature).where(ImageFeature.backbone_sha == member.feature_key, ImageFeature.region == MEMBER,
                                   ImageFeature.image_id.in_(image_ids)))}
    missing = [i for i in image_ids if i not in out]
    chips = crop_keys(session, missing) if missing else {}
    usable = [i for i in missing if CHIP_REGION in chips.get(i, {})]
    if usable:
        from shared.ml.nets.encoder import CONVERTED_SHA256, encode, load_encoder

        if member.encoder_sha != CONVERTED_SHA256:
            raise ValueError(f"the model's identity encoder {member.encoder_sha[:12]}... is not the installed one")
        faces = np.stack([load_crops(storage, chips[i], [CHIP_REGION])[CHIP_REGION] for i in usable])
        desc = encode(load_encoder(device), faces, flip=member.flip)
        for image_id, d in zip(usable, desc, strict=True):
            store_features(session, image_id, (MEMBER,), member.feature_key, d[None])
            out[image_id] = d
    return out, len(usable)

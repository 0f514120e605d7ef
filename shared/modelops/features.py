"""The feature store: pooled backbone features of scored photos, one row per (photo, region, backbone).

Scoring stores a photo's features (:func:`store_features`); the gallery and retraining read them,
and retraining computes the missing ones from the stored crops (:func:`cached_features`).
"""
from __future__ import annotations

import numpy as np
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.ml import heads as hd
from shared.ml.imaging import decode_png_gray
from shared.models import Crop, Face, ImageFeature
from shared.storage import Storage


def store_features(session: Session, image_id: int, regions: tuple[str, ...], backbone: str,
                   features: np.ndarray) -> None:
    """Upsert one cached feature row per region for ``backbone``."""
    rows = [{"image_id": image_id, "region": r, "backbone_sha": backbone, "vector": hd.pack(features[i])}
            for i, r in enumerate(regions)]
    stmt = insert(ImageFeature).values(rows)
    session.execute(stmt.on_conflict_do_update(index_elements=["image_id", "region", "backbone_sha"],
                                               set_={"vector": stmt.excluded.vector}))


def cached_features(session: Session, storage: Storage, model, backbone: str, image_ids: list[int]) -> tuple[dict, int]:
    """Cached features per image id, computing (and caching) the missing ones from the stored crops."""
    regions = list(model.regions)
    cached: dict[int, dict[str, np.ndarray]] = {}
    for f in session.scalars(select(ImageFeature).where(ImageFeature.backbone_sha == backbone,
                                                        ImageFeature.image_id.in_(image_ids))):
        cached.setdefault(f.image_id, {})[f.region] = hd.unpack(f.vector)
    missing = [i for i in image_ids if set(cached.get(i, {})) != set(regions)]
    if missing:
        crops = {(fid, c.region): c.object_key for fid, c in session.execute(
            select(Face.image_id, Crop).join(Crop, Crop.face_id == Face.id).where(Face.image_id.in_(missing)))}
        usable = [i for i in missing if all((i, r) in crops for r in regions)]
        stack = np.stack([np.stack([decode_png_gray(storage.get(crops[(i, r)])) for r in regions])
                          for i in usable]) if usable else np.zeros((0, len(regions), 100, 100), np.uint8)
        feats = hd.extract_features(model, stack)
        for i, image_id in enumerate(usable):
            store_features(session, image_id, tuple(regions), backbone, feats[i])
            cached[image_id] = {r: feats[i, j] for j, r in enumerate(regions)}
    out = {i: np.stack([v[r] for r in regions]) for i, v in cached.items() if set(v) == set(regions)}
    return out, len(missing)

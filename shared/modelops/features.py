"""The feature store: what each member computed its scores from, one row per (photo, name, feature key).

Scoring stores a photo's rows (:func:`feature_row`, :func:`store_feature_rows`): each member's features under
its feature key (the CASIA-Nets' pooled features under their backbone's hash; the encoder's descriptors of the
face chip and of each region cut under the encoder's key, named ``identity`` and by region). The gallery and
retraining read them, and retraining computes the missing ones from the stored crops (:func:`cached_vectors`).
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import upsert
from shared.ml.formats.vectors import pack, unpack
from shared.modelops.crops import crop_keys, load_crops
from shared.models import ImageFeature
from shared.storage import Storage


def feature_rows(image_id: int, names: tuple[str, ...], key: str, features: np.ndarray) -> list[dict]:
    """The feature store's rows of one photo: one per name, under ``key``."""
    return [feature_row(image_id, r, key, features[i]) for i, r in enumerate(names)]


def feature_row(image_id: int, name: str, key: str, vector: np.ndarray) -> dict:
    """One feature store row: the photo's vector ``name`` under ``key``."""
    return {"image_id": image_id, "region": name, "backbone_sha": key, "vector": pack(vector)}


_UPSERT = upsert(ImageFeature, ["image_id", "region", "backbone_sha"], ["vector"])


def store_feature_rows(session: Session, rows: list[dict]) -> None:
    """Upsert rows of :func:`feature_rows` (any photos, any keys) in one statement."""
    if rows:
        session.execute(_UPSERT, rows)


def stored_vectors(session: Session, key: str, names: tuple[str, ...], image_ids: list[int]) -> dict[int, np.ndarray]:
    """The photos that have every one of ``names`` under ``key``: ``M x F`` each, in ``names``' order."""
    per: dict[int, dict[str, np.ndarray]] = {}
    for f in session.scalars(select(ImageFeature).where(ImageFeature.backbone_sha == key,
                                                        ImageFeature.region.in_(names),
                                                        ImageFeature.image_id.in_(image_ids))):
        per.setdefault(f.image_id, {})[f.region] = unpack(f.vector)
    return {i: np.stack([v[n] for n in names]) for i, v in per.items() if set(v) == set(names)}


def cached_vectors(session: Session, storage: Storage, key: str, names: tuple[str, ...], crops: tuple[str, ...],
                   compute: Callable[[dict[str, np.ndarray]], np.ndarray],
                   image_ids: list[int]) -> tuple[dict[int, np.ndarray], int]:
    """``names`` under ``key`` per photo (``M x F``), computing (and caching) the missing ones from the stored
    ``crops`` with ``compute`` (crops by name, ``K x ...`` each -> ``K x M x F``). Photos whose crops are not
    stored (aligned before those crops were kept) have none: their alignment re-runs on a re-score.

    Returns the vectors and how many photos' vectors were computed.
    """
    out = stored_vectors(session, key, names, image_ids)
    missing = [i for i in image_ids if i not in out]
    keys = crop_keys(session, missing) if missing else {}
    usable = [i for i in missing if all(c in keys.get(i, {}) for c in crops)]
    if usable:
        faces = [load_crops(storage, keys[i], crops) for i in usable]
        vectors = compute({c: np.stack([f[c] for f in faces]) for c in crops})
        store_feature_rows(session, [row for image_id, v in zip(usable, vectors, strict=True)
                                     for row in feature_rows(image_id, names, key, v)])
        out.update(zip(usable, vectors, strict=True))
    return out, len(usable)

"""Saliency heatmaps of a scored photo, for the portal and the API: which model, which syndrome and region,
the stored overlay or a fresh one, and the audit row.

Made on demand with the model version that scored the photo, then kept in the object store (key: the photo's
hash, the checkpoint's hash, the syndrome and the region). Models are loaded once per process
(:class:`VersionCache`); torch is imported on the first heatmap, never by the portal's start.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from minio.error import S3Error
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.audit import audit
from shared.models import Image, ModelVersion, Result
from shared.services import Refusal
from shared.storage import MISSING, Storage, get_storage, heatmap_key

logger = logging.getLogger(__name__)
ALL = "all"  # the combined map: every member weighted by its share (shared.ml.explain.saliency.ALL)


class VersionCache:
    """Model versions loaded for saliency in one process (CPU), the last ``size`` used kept, and the identity
    encoder (loaded once, for members built on it)."""

    def __init__(self, size: int = 2, device: str = "cpu"):
        self.size = size
        self.device = device
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._encoder = None
        # Grad-CAM hooks a layer for the length of a call: one computation at a time per process.
        self.compute_lock = threading.Lock()

    def encoder(self):
        with self._lock:
            if self._encoder is None:
                from shared.config import get_settings
                from shared.ml.nets.encoder import load_encoder

                self._encoder = load_encoder(self.device, verify=get_settings().weights_verify)
            return self._encoder

    def get(self, checkpoint_sha256: str, load_bytes) -> Any:
        """The model of a checkpoint; ``load_bytes()`` fetches the checkpoint when it is not loaded."""
        with self._lock:
            if checkpoint_sha256 in self._models:
                self._models.move_to_end(checkpoint_sha256)
                return self._models[checkpoint_sha256]
            data = load_bytes()
            if hashlib.sha256(data).hexdigest() != checkpoint_sha256:
                raise ValueError("the checkpoint does not match its sha256")
            from shared.ml.train.checkpoint import load_checkpoint

            model, _ = load_checkpoint(data, self.device)
            self._models[checkpoint_sha256] = model
            while len(self._models) > self.size:
                self._models.popitem(last=False)
            return model


_models: VersionCache | None = None


def _cache() -> VersionCache:
    global _models
    if _models is None:
        _models = VersionCache()
    return _models


def class_index(classes: list[dict], syndrome: str) -> int | None:
    """The position of ``syndrome`` (a class index, or a class name) in a model's class list."""
    syndrome = syndrome.strip()
    if syndrome.isascii() and syndrome.isdigit():
        index = int(syndrome)
        return index if index < len(classes) else None
    names = [c["name"] for c in classes]
    return names.index(syndrome) if syndrome in names else None


@dataclass
class Heatmap:
    png: bytes
    cached: bool
    version: ModelVersion
    syndrome: dict
    region: str


def heatmap(db: Session, image: Image, syndrome: str, region: str, user_id: int, ip: str | None,
            via: str) -> Heatmap:
    """The overlay PNG of ``image`` for ``syndrome`` (a class index or name) and ``region``: ``all`` (every member
    of the model that scored the photo, weighted by its share of the aggregate) or one member's own map (a region,
    or ``identity``), audited as ``heatmap_view``.

    Raises:
        Refusal: no result yet (404), an unknown syndrome or member (400), crops or model gone (404).
    """
    result = db.scalars(select(Result).where(Result.image_id == image.id)
                        .order_by(Result.created_at.desc(), Result.id.desc())).first()
    if result is None or image.face is None or not image.face.aligned_key:
        raise Refusal("this photo has no result yet", 404)
    version = db.get(ModelVersion, result.model_version_id)
    members = tuple((version.config.get("weights") or {}) or version.config.get("regions") or ())
    index = class_index(version.classes, syndrome)
    if index is None:
        raise Refusal("syndrome: give a class index or the name of a syndrome in this photo's ranking")
    if region != ALL and region not in members:
        raise Refusal(f"region must be {ALL} or one of this model's members: {', '.join(members)}")
    chosen = version.classes[index]
    storage = get_storage()
    key = heatmap_key(image.sha256, version.checkpoint_sha256, chosen["syndrome_id"], region)
    png, cached = storage.get_if_present(key), True
    if png is None:
        try:
            png, cached = _render(db, storage, version, image, index, region), False
        except S3Error as exc:  # the checkpoint or the aligned face is gone
            if exc.code not in MISSING:
                raise
            png = None
        if png is None:
            raise Refusal("this photo's crops or its model are missing; re-score it", 404)
        storage.put(key, png, "image/png")
    audit(db, "heatmap_view", user_id, "image", image.id, ip=ip, model_version=version.id,
          syndrome_id=chosen["syndrome_id"], region=region, cached=cached, via=via)
    db.commit()
    return Heatmap(png, cached, version, chosen, region)


def _render(db: Session, storage: Storage, version: ModelVersion, image: Image, index: int,
            region: str) -> bytes | None:
    """The overlay, computed with the model that scored the photo; None when the photo's crops are gone."""
    import numpy as np

    from shared.ml.explain.saliency import chip_placement, member_heatmap_png
    from shared.modelops.crops import aligned_face, crop_keys, load_crops

    cache = _cache()
    model = cache.get(version.checkpoint_sha256, lambda: storage.get(version.checkpoint_key))
    keys = crop_keys(db, [image.id]).get(image.id, {})
    if any(name not in keys for name in model.inputs):
        return None
    crops = {name: crop[None] for name, crop in load_crops(storage, keys, model.inputs).items()}
    aligned = aligned_face(storage, image.sha256, image.face.aligned_key)
    m = np.asarray(image.face.transform)
    placed = chip_placement(np.asarray(image.face.landmarks) @ m[:, :2].T + m[:, 2], model.contract)
    encoder = cache.encoder() if model.needs_encoder else None
    with cache.compute_lock:
        png = member_heatmap_png(model, crops, aligned, index, region, encoder, placed)
    logger.info("image=%s state=heatmap model=%s class=%d member=%s", image.id, version.name, index, region)
    return png

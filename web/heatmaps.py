"""Saliency heatmaps of a scored photo: where the model saw a syndrome, drawn over the aligned face.

Made on demand with the model version that scored the photo, then kept in the object store
(key: the photo's hash, the checkpoint's hash, the syndrome and the region). Owner or admin
only, like the photo itself; every view is audited.
"""
from __future__ import annotations

import logging

from flask import Blueprint, Response, abort, jsonify, request
from flask_login import current_user
from minio.error import S3Error
from sqlalchemy import select

from shared.audit import audit
from shared.models import ModelVersion, Result
from shared.storage import get_storage, heatmap_key
from web import limits
from web.access import case_or_404
from web.db import get_db

logger = logging.getLogger(__name__)
bp = Blueprint("heatmaps", __name__)
_models = None  # saliency.VersionCache, created on first use (torch is imported then)
MISSING = ("NoSuchKey", "NoSuchObject")


def _cache():
    global _models
    if _models is None:
        from shared.ml.saliency import VersionCache

        _models = VersionCache()
    return _models


def _bad(message: str, code: int = 400):
    if request.path.startswith("/api/"):
        return jsonify(error=message), code
    return Response(message, code, mimetype="text/plain")


def class_index(classes: list[dict], syndrome: str) -> int | None:
    """The position of ``syndrome`` (a class index, or a class name) in a model's class list."""
    syndrome = syndrome.strip()
    if syndrome.isascii() and syndrome.isdigit():
        index = int(syndrome)
        return index if index < len(classes) else None
    names = [c["name"] for c in classes]
    return names.index(syndrome) if syndrome in names else None


@bp.get("/cases/<int:case_id>/images/<int:image_id>/heatmap.png")
@bp.get("/api/v1/cases/<int:case_id>/images/<int:image_id>/heatmap.png", endpoint="api_heatmap_png")
@limits.heatmaps
def heatmap_png(case_id: int, image_id: int):
    """``?syndrome=<class index or name>&region=<all|region>``: the overlay PNG, for the model that scored
    the photo."""
    from shared.ml.saliency import ALL

    db = get_db()
    case = case_or_404(case_id)
    image = next((i for i in case.images if i.id == image_id), None)
    if image is None:
        abort(404)
    result = db.scalars(select(Result).where(Result.image_id == image.id)
                        .order_by(Result.created_at.desc(), Result.id.desc())).first()
    if result is None or image.face is None or not image.face.aligned_key:
        return _bad("this photo has no result yet", 404)
    version = db.get(ModelVersion, result.model_version_id)
    regions = tuple(version.config.get("regions") or ())
    index = class_index(version.classes, request.args.get("syndrome", ""))
    if index is None:
        return _bad("syndrome: give a class index or the name of a syndrome in this photo's ranking")
    region = request.args.get("region", ALL)
    if region != ALL and region not in regions:
        return _bad(f"region must be {ALL} or one of {', '.join(regions)}")
    syndrome = version.classes[index]
    storage = get_storage()
    key = heatmap_key(image.sha256, version.checkpoint_sha256, syndrome["syndrome_id"], region)
    png, cached = _stored(storage, key), True
    if png is None:
        try:
            png, cached = _render(db, storage, version, image, index, region), False
        except S3Error as exc:  # the checkpoint or the aligned face is gone
            if exc.code not in MISSING:
                raise
            png = None
        if png is None:
            return _bad("this photo's crops or its model are missing; re-score it", 404)
        storage.put(key, png, "image/png")
    audit(db, "heatmap_view", current_user.id, "image", image.id, ip=request.remote_addr,
          model_version=version.id, syndrome_id=syndrome["syndrome_id"], region=region, cached=cached,
          via="api" if request.path.startswith("/api/") else "portal")
    db.commit()
    return Response(png, mimetype="image/png", headers={"Cache-Control": "private, no-store"})


def _stored(storage, key: str) -> bytes | None:
    try:
        return storage.get(key)
    except S3Error as exc:
        if exc.code not in MISSING:
            raise
        return None


def _render(db, storage, version: ModelVersion, image, index: int, region: str) -> bytes | None:
    from shared.ml.imaging import decode_stored
    from shared.ml.saliency import heatmap_png
    from shared.modelops.crops import crop_keys, region_stack

    cache = _cache()
    model = cache.get(version.checkpoint_sha256, lambda: storage.get(version.checkpoint_key))
    keys = crop_keys(db, [image.id]).get(image.id, {})
    if any(r not in keys for r in model.regions):
        return None
    crops = region_stack(storage, keys, model.regions)
    aligned = decode_stored(storage.get(image.face.aligned_key))
    with cache.compute_lock:
        png = heatmap_png(model, crops, aligned, index, region)
    logger.info("image=%s state=heatmap model=%s class=%d region=%s", image.id, version.name, index, region)
    return png

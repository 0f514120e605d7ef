"""The per-image pipeline as plain functions: detect -> align -> infer.

Tasks in ``worker.tasks`` only unpack arguments and call these. Each stage reads
its inputs from the database and the object store, writes its outputs with
upserts (a re-delivered task replaces, never duplicates), and records its state
on the image. Permanent problems reject the image with a reason; transient ones
raise, and the task retries with backoff.
"""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from minio.error import S3Error
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from shared.config import get_settings
from shared.db import session_scope
from shared.ml.gestalt import predict, rank
from shared.ml.identity import CHIP_REGION, MEMBER
from shared.ml.imaging import ImageRejected, decode_png_gray, decode_png_rgb, decode_stored, encode_png
from shared.ml.preprocess import Preprocessor
from shared.ml.regions import ALL_REGIONS
from shared.modelops.features import store_features
from shared.modelops.registry import ModelCache, active_version
from shared.models import Crop, Face, Image, ImageStatus, RegionScore, Result
from shared.models.cases import ACTIVE_STATES
from shared.monitoring import heartbeat
from shared.storage import aligned_key, crop_key, get_storage

logger = logging.getLogger(__name__)

FINAL_STATES = (ImageStatus.done.value, ImageStatus.rejected.value)

_preprocessor: Preprocessor | None = None
_models: ModelCache | None = None
_encoder = None


def preprocessor() -> Preprocessor:
    """The detector and landmark models of this process, created on first use (after fork)."""
    global _preprocessor
    if _preprocessor is None:
        # Every region is cut, so that any model version (whatever regions its config names) can score it.
        _preprocessor = Preprocessor.from_settings(get_settings(), regions=ALL_REGIONS)
    return _preprocessor


def model_cache() -> ModelCache:
    global _models
    if _models is None:
        s = get_settings()
        _models = ModelCache(check_seconds=s.model_check_seconds, device=s.device, compile=s.infer_compile)
    return _models


def encoder():
    """The face-identity encoder of this process (for models with an identity member), loaded on first use."""
    global _encoder
    if _encoder is None:
        from shared.ml.encoder import load_encoder
        from shared.ml.gestalt import resolve_device

        s = get_settings()
        _encoder = load_encoder(resolve_device(s.device), verify=s.weights_verify)
    return _encoder


def _node() -> str | None:
    """The Celery node running the current task (e.g. ``pipeline@gpu-3``), for the admin and for tests."""
    from celery import current_task

    return current_task.request.hostname if current_task and current_task.request else None


def _stamp(image: Image, **times: float | str | None) -> None:
    image.stage_times = {**(image.stage_times or {}), **times}


def _begin(image_id: int, status: ImageStatus, stamp: str) -> Image | None:
    """Move the image into a stage; None when it no longer exists or is already final."""
    heartbeat(_node(), model_cache().loaded_name)
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if image is None:
            logger.info("image=%s state=skipped reason=deleted", image_id)
            return None
        if image.status in FINAL_STATES:
            logger.info("image=%s state=skipped reason=%s", image_id, image.status)
            return None
        image.status = status.value
        _stamp(image, **{stamp: time.time(), stamp.replace("_start", "_by"): _node()})
        session.flush()
        session.expunge(image)
        return image


def reject(image_id: int, reason: str) -> None:
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if image is not None:
            image.status = ImageStatus.rejected.value
            image.reason = reason[:500]
            _stamp(image, rejected=time.time())
    logger.info("image=%s state=rejected reason=%r", image_id, reason)


def note_retry(image_id: int, error: str) -> None:
    with session_scope() as session:
        image = session.get(Image, image_id)
        if image is not None:
            times = image.stage_times or {}
            _stamp(image, retries=int(times.get("retries", 0)) + 1, last_error=error)


def mark_failed(image_id: int, reason: str) -> None:
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if image is not None and image.status not in FINAL_STATES:
            image.status = ImageStatus.failed.value
            image.reason = reason[:500]
            _stamp(image, failed=time.time())
    logger.warning("image=%s state=failed reason=%r", image_id, reason)


def _load_rgb(image: Image) -> np.ndarray:
    try:
        data = get_storage().get(image.object_key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            raise ImageRejected("the stored photo is missing; upload it again") from exc
        raise
    return decode_stored(data)


def detect(image_id: int | None) -> int | None:
    """Find the main face; reject the image when there is none."""
    if image_id is None:
        return None
    image = _begin(image_id, ImageStatus.detecting, "detect_start")
    if image is None:
        return None
    try:
        rgb = _load_rgb(image)
        found = preprocessor().detect(rgb)
    except ImageRejected as exc:
        reject(image_id, exc.reason)
        return None
    provenance = preprocessor().provenance
    values = {"image_id": image_id, "box": [float(c) for c in found.face.box], "confidence": found.face.score,
              "faces_found": int(found.faces_found), "rotation": found.rotation, "detector": provenance["detector"],
              "weights": {"detector": provenance["detector_sha256"]}}
    with session_scope() as session:
        stmt = insert(Face).values(**values)
        session.execute(stmt.on_conflict_do_update(index_elements=[Face.image_id], set_={
            k: stmt.excluded[k] for k in ("box", "confidence", "faces_found", "rotation", "detector", "weights")}))
        image = session.get(Image, image_id, with_for_update=True)
        if image is None:
            return None
        image.status = ImageStatus.aligning.value
        _stamp(image, detect_end=time.time())
    return image_id


def align(image_id: int | None) -> int | None:
    """Landmarks, alignment and region crops of the detected face."""
    if image_id is None:
        return None
    image = _begin(image_id, ImageStatus.aligning, "align_start")
    if image is None:
        return None
    with session_scope() as session:
        face = session.scalars(select(Face).where(Face.image_id == image_id)).first()
        box, rotation = (tuple(face.box), face.rotation or 0.0) if face else (None, 0.0)
    if box is None:  # detect's output vanished (a re-run after a cleanup): start over
        return detect(image_id)
    storage = get_storage()
    try:
        rgb = _load_rgb(image)
        aligned = preprocessor().align(rgb, box, rotation)
    except ImageRejected as exc:
        reject(image_id, exc.reason)
        return None
    crop_keys = {}
    for region, crop in aligned.crops.items():
        crop_keys[region] = storage.put(crop_key(image.sha256, region), encode_png(crop), "image/png")
    if aligned.chip is not None:  # the identity member's input
        crop_keys[CHIP_REGION] = storage.put(crop_key(image.sha256, CHIP_REGION), encode_png(aligned.chip), "image/png")
    face_key = storage.put(aligned_key(image.sha256), encode_png(aligned.aligned_rgb), "image/png")
    with session_scope() as session:
        face = session.scalars(select(Face).where(Face.image_id == image_id).with_for_update()).one()
        face.landmarks = np.round(aligned.landmarks, 2).tolist()
        face.transform = aligned.alignment.matrix.tolist()
        face.aligned_key = face_key
        face.landmarker = preprocessor().landmarker_name
        face.weights = {**(face.weights or {}), "landmarker": preprocessor().provenance["landmarker_sha256"]}
        face.quality = aligned.quality
        face.measurements = aligned.measurements
        stmt = insert(Crop).values([{"face_id": face.id, "region": r, "object_key": k} for r, k in crop_keys.items()])
        session.execute(stmt.on_conflict_do_update(index_elements=["face_id", "region"],
                                                   set_={"object_key": stmt.excluded.object_key}))
        image = session.get(Image, image_id, with_for_update=True)
        image.status = ImageStatus.scoring.value
        _stamp(image, align_end=time.time())
    return image_id


def queue_for_scoring(image: Image) -> None:
    """Mark a photo (in an open transaction) as waiting for scoring, claimable by any infer batch."""
    image.status = ImageStatus.scoring.value
    image.stage_times = {k: v for k, v in (image.stage_times or {}).items()
                         if k not in ("infer_start", "infer_by", "batched_with")}


def claim_waiting(image_id: int, limit: int) -> list[int]:
    """Other photos waiting for scoring that no worker has started, locked and stamped for this batch.

    Under load the ``infer`` queue holds many photos; scoring them in one forward pass is what
    makes a GPU (or the CPU's vector units) worth having. A claimed photo keeps its own queued
    message: when that message runs, the photo is already done and the task skips it. If this
    worker dies mid-batch, those messages (or the sweep) score the photos instead, so a crash
    costs time, never a photo.
    """
    if limit <= 0:
        return []
    with session_scope() as session:
        rows = session.scalars(
            select(Image).where(Image.status == ImageStatus.scoring.value, Image.id != image_id,
                                ~Image.stage_times.has_key("infer_start"))
            .order_by(Image.id).limit(limit).with_for_update(skip_locked=True)).all()
        node = _node()
        for image in rows:
            _stamp(image, infer_start=time.time(), infer_by=node, batched_with=image_id)
        return [image.id for image in rows]


def infer(image_id: int | None) -> int | None:
    """Score the crops with the active model; write region scores and the ranking.

    Photos that wait behind this one are claimed (up to ``GESTALT_INFER_BATCH`` in all) and
    scored in the same forward pass.
    """
    if image_id is None:
        return None
    image = _begin(image_id, ImageStatus.scoring, "infer_start")
    if image is None:
        return None
    storage = get_storage()
    settings = get_settings()
    with session_scope() as session:
        loaded = model_cache().active(session, storage)
        heartbeat(_node(), loaded.name if loaded else None)
        if loaded is None:
            image = session.get(Image, image_id, with_for_update=True)
            image.status = ImageStatus.awaiting_model.value
            _stamp(image, awaiting_model=time.time())
            logger.info("image=%s state=awaiting_model", image_id)
            return None
    batch = [image_id, *claim_waiting(image_id, settings.infer_batch - 1)]
    with session_scope() as session:
        crops: dict[int, dict[str, str]] = {}
        for face_image_id, region, key in session.execute(
                select(Face.image_id, Crop.region, Crop.object_key).join(Crop, Crop.face_id == Face.id)
                .where(Face.image_id.in_(batch))):
            crops.setdefault(face_image_id, {})[region] = key
    member = loaded.model.identity
    needed = (*loaded.regions, CHIP_REGION) if member is not None else loaded.regions
    ready = [i for i in batch if all(r in crops.get(i, {}) for r in needed)]
    if ready:
        stack = np.stack([np.stack([decode_png_gray(storage.get(crops[i][r])) for r in loaded.regions])
                          for i in ready])
        descriptors = None
        if member is not None:
            from shared.ml.encoder import encode

            descriptors = encode(encoder(), np.stack([decode_png_rgb(storage.get(crops[i][CHIP_REGION]))
                                                      for i in ready]), precision=settings.infer_precision)
        pred = predict(loaded.model, stack, flip_tta=settings.infer_flip_tta, precision=settings.infer_precision,
                       descriptors=descriptors)
        for k, i in enumerate(ready):
            identity = None if descriptors is None else {
                "probs": pred.identity_probs[k], "descriptor": descriptors[k], "encoder_sha": member.encoder_sha,
                "ood": pred.ood[k] if pred.ood else None}
            write_scores(i, loaded.version_id, loaded.regions, loaded.classes, pred.region_probs[k],
                         pred.aggregate[k], loaded.backbone_sha, pred.features[k], identity)
        if len(ready) > 1:
            logger.info("image=%s state=batch scored=%d", image_id, len(ready))
    # A claimed photo without its crops is left to its own message, which realigns it.
    if image_id not in ready:  # crops lost or never made: redo alignment, which continues here
        logger.info("image=%s state=realign", image_id)
        return infer(align(image_id))
    return image_id


def write_scores(image_id: int, version_id: int, regions: tuple[str, ...], classes: list[dict],
                 region_probs: np.ndarray, aggregate: np.ndarray, backbone: str, features: np.ndarray,
                 identity: dict | None = None) -> None:
    """Member scores, the ranking and (for retraining and the gallery) the features, in one transaction.

    Args:
        identity: the identity member's ``probs``, the face's ``descriptor`` (stored as a feature of
            the encoder, ``encoder_sha``) and its ``ood`` score; None for a model without that member.
    """
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if image is None:
            return
        store_features(session, image_id, regions, backbone, features)
        rows = [{"image_id": image_id, "model_version_id": version_id, "region": r,
                 "scores": [round(float(p), 6) for p in region_probs[i]]} for i, r in enumerate(regions)]
        if identity is not None:
            store_features(session, image_id, (MEMBER,), identity["encoder_sha"], identity["descriptor"][None])
            rows.append({"image_id": image_id, "model_version_id": version_id, "region": MEMBER,
                         "scores": [round(float(p), 6) for p in identity["probs"]]})
        stmt = insert(RegionScore).values(rows)
        session.execute(stmt.on_conflict_do_update(index_elements=["image_id", "model_version_id", "region"],
                                                   set_={"scores": stmt.excluded.scores}))
        stmt = insert(Result).values(image_id=image_id, model_version_id=version_id,
                                     scores=[round(float(p), 6) for p in aggregate],
                                     ranking=rank(aggregate, classes), ood=identity and identity["ood"])
        session.execute(stmt.on_conflict_do_update(index_elements=["image_id", "model_version_id"], set_={
            "scores": stmt.excluded.scores, "ranking": stmt.excluded.ranking, "ood": stmt.excluded.ood}))
        image.status = ImageStatus.done.value
        image.reason = None
        _stamp(image, done=time.time())
    logger.info("image=%s state=done model=%s", image_id, version_id)


def sweep(enqueue_pipeline: Any, enqueue_infer: Any) -> dict[str, int]:
    """Re-queue images whose message was lost, and score images waiting for a model.

    Args:
        enqueue_pipeline: called with an image id to start its whole chain again.
        enqueue_infer: called with an image id to score it.
    """
    settings = get_settings()
    cutoff = time.time() - settings.requeue_after_seconds
    to_pipeline: list[int] = []
    to_infer: list[int] = []
    failed = 0
    with session_scope() as session:
        stale = session.scalars(select(Image).where(Image.status.in_(ACTIVE_STATES), Image.updated_at.isnot(None))
                                .with_for_update(skip_locked=True))
        for image in stale:
            if image.updated_at.timestamp() > cutoff:
                continue
            sweeps = int((image.stage_times or {}).get("sweeps", 0))
            if image.created_at.timestamp() < time.time() - settings.give_up_seconds:
                image.status = ImageStatus.failed.value
                image.reason = f"processing did not finish within {settings.give_up_seconds // 3600} hours"
                failed += 1
                continue
            image.status = ImageStatus.queued.value
            _stamp(image, sweeps=sweeps + 1)
            to_pipeline.append(image.id)
        if active_version(session) is not None:
            waiting = session.scalars(select(Image).where(Image.status == ImageStatus.awaiting_model.value)
                                      .with_for_update(skip_locked=True))
            for image in waiting:
                # "scoring" is an active state: if this message is lost, the stale sweep re-runs it.
                queue_for_scoring(image)
                to_infer.append(image.id)
    # Commit first, then enqueue: a worker must see the rows we just wrote.
    for image_id in to_pipeline:
        enqueue_pipeline(image_id)
    for image_id in to_infer:
        enqueue_infer(image_id)
    if to_pipeline or failed or to_infer:
        logger.info("sweep requeued=%d failed=%d woken=%d", len(to_pipeline), failed, len(to_infer))
    return {"requeued": len(to_pipeline), "failed": failed, "woken": len(to_infer)}

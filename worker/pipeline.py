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
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from minio.error import S3Error
from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert

from shared import photos
from shared.config import get_settings
from shared.db import session_scope
from shared.ml.detection import DetectedFace
from shared.ml.gestalt import predict
from shared.ml.identity import CHIP_REGION, MEMBER
from shared.ml.imaging import ImageRejected, decode_png_gray, decode_png_rgb, decode_stored, encode_png
from shared.ml.preprocess import Detection, Preprocessor
from shared.ml.ranking import rank
from shared.ml.regions import ALL_REGIONS
from shared.modelops.features import store_features
from shared.modelops.registry import ModelCache, active_version
from shared.models import Crop, Face, Image, ImageStatus, RegionScore, Result
from shared.monitoring import heartbeat
from shared.storage import aligned_key, crop_key, get_storage

logger = logging.getLogger(__name__)


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


def _begin(image_id: int, status: ImageStatus, key: str) -> Image | None:
    """Move the image into a stage; None when it no longer exists or is already final."""
    heartbeat(_node(), model_cache().loaded_name)
    return photos.enter_stage(image_id, status, key, _node())


def _load_rgb(image: Image) -> np.ndarray:
    try:
        data = get_storage().get(image.object_key)
    except S3Error as exc:
        if exc.code in ("NoSuchKey", "NoSuchObject"):
            raise ImageRejected("the stored photo is missing; upload it again") from exc
        raise
    return decode_stored(data)


# ----- batched detection, and detect + align + infer of a claimed batch in one go ----------
#
# A detect task claims the photos waiting for detection behind it (SKIP LOCKED), up to
# ``GESTALT_DETECT_BATCH`` in all, and runs the detector on them in one batch. A worker that
# consumes detect, align and infer (``worker.celery_app.fuses_stages``) carries the batch on
# through landmarks, alignment and scoring in one go, handing the decoded photo and the crops
# from stage to stage in memory. Each step commits its results for the whole batch in one
# transaction, so a crash between steps leaves every photo in a state its own message resumes.
#
# A claimed photo keeps its own queued message. While a batch holds the photo (``claimed_at``
# younger than ``GESTALT_CLAIM_LEASE_SECONDS``), that message raises :class:`Claimed` and the
# task tries again shortly; once the batch has moved the photo on, the message continues from
# wherever the photo is (or stops when it is done). If the batch's worker died, the lease runs
# out and the message redoes the stage: a crash costs time, never a photo.

CLAIM_AT, CLAIM_BY = "claimed_at", "claimed_by"
PAST_DETECTION = (ImageStatus.aligning.value, ImageStatus.scoring.value)
_PAST = "past"

_originals: OrderedDict[str, np.ndarray] = OrderedDict()
_pool: ThreadPoolExecutor | None = None


class Claimed(Exception):  # noqa: N818 - a state, not an error
    """The photo is held by another worker's batch: its own message tries again after ``wait`` seconds."""

    def __init__(self, image_id: int, wait: float):
        super().__init__(f"image {image_id} is in another worker's batch")
        self.image_id = image_id
        self.wait = wait


def io_pool() -> ThreadPoolExecutor:
    """Threads for object-store round trips and image codecs (both release the GIL); made after fork."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="pipeline-io")
    return _pool


def original_rgb(image: Image) -> np.ndarray:
    """The decoded original, from this process's small cache (by sha256) when a stage before decoded it."""
    cached = _originals.get(image.sha256)
    if cached is not None:
        _originals.move_to_end(image.sha256)
        return cached
    rgb = _load_rgb(image)
    keep = get_settings().decode_cache
    if keep > 0:
        _originals[image.sha256] = rgb
        while len(_originals) > keep:
            _originals.popitem(last=False)
    return rgb


def _claimer() -> str:
    import os

    return f"{_node()}:{os.getpid()}"


def _claim_live(image: Image, now: float) -> bool:
    """Whether another process's batch holds the photo (this process runs one task at a time)."""
    times = image.stage_times or {}
    at = times.get(CLAIM_AT)
    return at is not None and now - float(at) < get_settings().claim_lease_seconds and \
        times.get(CLAIM_BY) != _claimer()


def _enter_detect(image_id: int) -> Image | str | None:
    """Lock the photo and move it into detection, under this task's claim.

    Returns the photo (detached), ``_PAST`` when it is already past detection (its chain goes on),
    or None when it is gone or final. Raises :class:`Claimed` while another batch holds it.
    """
    now = time.time()
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if image is None:
            logger.info("image=%s state=skipped reason=deleted", image_id)
            return None
        if image.status in photos.FINISHED:
            logger.info("image=%s state=skipped reason=%s", image_id, image.status)
            return None
        if _claim_live(image, now):
            raise Claimed(image_id, min(1.0, get_settings().claim_lease_seconds))
        if image.status in PAST_DETECTION:
            return _PAST
        photos.move(image, ImageStatus.detecting, detect_start=now, detect_by=_node(),
                    **{CLAIM_AT: now, CLAIM_BY: _claimer()})
        session.flush()
        session.expunge(image)
        return image


def claim_for_detection(image_id: int, limit: int) -> list[Image]:
    """Other photos waiting for detection that no live batch holds, locked, claimed and stamped for this one."""
    if limit <= 0:
        return []
    now = time.time()
    with session_scope() as session:
        rows = session.scalars(
            select(Image).where(Image.status == ImageStatus.queued.value, Image.id != image_id)
            .order_by(Image.id).limit(limit).with_for_update(skip_locked=True)).all()
        out = []
        for image in rows:
            if _claim_live(image, now):
                continue
            photos.move(image, ImageStatus.detecting, detect_start=now, detect_by=_node(), batched_with=image_id,
                        **{CLAIM_AT: now, CLAIM_BY: _claimer()})
            out.append(image)
        session.flush()
        for image in out:
            session.expunge(image)
        return out


def _locked(session, ids: list[int]) -> dict[int, Image]:
    """The batch's photos that still exist and are not final, locked, by id."""
    rows = session.scalars(select(Image).where(Image.id.in_(ids)).order_by(Image.id).with_for_update()).all()
    return {i.id: i for i in rows if i.status not in photos.FINISHED}


def _reject_in(image: Image, reason: str, now: float) -> None:
    photos.move(image, ImageStatus.rejected, reason, rejected=now, **{CLAIM_AT: None})
    logger.info("image=%s state=rejected reason=%r", image.id, reason)


def _detect_batch(batch: list[Image], fused: bool) -> list[tuple[Image, np.ndarray, Any]]:
    """Decode, detect in one batch, and record faces and rejections in one transaction.

    Returns (photo, decoded original, detection) of the photos that go on to alignment.
    """
    def load(image: Image) -> np.ndarray | ImageRejected:
        try:
            return original_rgb(image)
        except ImageRejected as exc:
            return exc

    loaded = list(io_pool().map(load, batch))
    usable = [k for k, rgb in enumerate(loaded) if not isinstance(rgb, ImageRejected)]
    found: list = list(loaded)
    for k, result in zip(usable, preprocessor().detect_batch([loaded[k] for k in usable]), strict=True):
        found[k] = result
    provenance = preprocessor().provenance
    now = time.time()
    out = []
    with session_scope() as session:
        rows = _locked(session, [i.id for i in batch])
        faces = []
        for image, rgb, result in zip(batch, loaded, found, strict=True):
            row = rows.get(image.id)
            if row is None:
                continue
            if isinstance(result, ImageRejected):
                _reject_in(row, result.reason, now)
                continue
            faces.append({"image_id": image.id, "box": [float(c) for c in result.face.box],
                          "confidence": result.face.score, "faces_found": int(result.faces_found),
                          "rotation": result.rotation, "detector": provenance["detector"],
                          "weights": {"detector": provenance["detector_sha256"]}})
            if fused:  # this worker aligns it next, under the same claim
                photos.move(row, ImageStatus.aligning, detect_end=now, align_start=now, align_by=_node(),
                            **{CLAIM_AT: now})
            else:
                photos.move(row, ImageStatus.aligning, detect_end=now, **{CLAIM_AT: None})
            out.append((image, rgb, result))
        if faces:
            stmt = insert(Face).values(faces)
            session.execute(stmt.on_conflict_do_update(index_elements=[Face.image_id], set_={
                k: stmt.excluded[k] for k in ("box", "confidence", "faces_found", "rotation", "detector", "weights")}))
    return out


def _put_png(key: str, array: np.ndarray) -> str:
    return get_storage().put(key, encode_png(array), "image/png")


def _align_batch(items: list[tuple[Image, np.ndarray, Any]], fused: bool = True) -> list[tuple[Image, Any]]:
    """Landmarks for the whole batch in one pass, the quality gate, crops; stored in one transaction.

    Returns (photo, aligned face) of the photos that go on to scoring, their crops in memory.
    """
    if not items:
        return []
    results = preprocessor().align_batch([rgb for _, rgb, _ in items], [d.face.box for _, _, d in items],
                                         [d.rotation for _, _, d in items])
    puts = {}
    for (image, _, _), aligned in zip(items, results, strict=True):
        if isinstance(aligned, ImageRejected):
            continue
        objects = {region: (crop_key(image.sha256, region), crop) for region, crop in aligned.crops.items()}
        if getattr(aligned, "chip", None) is not None:  # the identity member's input
            objects[CHIP_REGION] = (crop_key(image.sha256, CHIP_REGION), aligned.chip)
        objects[None] = (aligned_key(image.sha256), aligned.aligned_rgb)
        puts[image.id] = {name: io_pool().submit(_put_png, key, array) for name, (key, array) in objects.items()}
    keys = {i: {name: f.result() for name, f in futures.items()} for i, futures in puts.items()}
    pre = preprocessor()
    now = time.time()
    out = []
    with session_scope() as session:
        rows = _locked(session, [image.id for image, _, _ in items])
        faces = {f.image_id: f for f in session.scalars(
            select(Face).where(Face.image_id.in_(list(keys))).with_for_update())}
        crop_rows = []
        for (image, _, _), aligned in zip(items, results, strict=True):
            row = rows.get(image.id)
            if row is None:
                continue
            if isinstance(aligned, ImageRejected):
                _reject_in(row, aligned.reason, now)
                continue
            face = faces.get(image.id)
            if face is None:  # detection's output vanished meanwhile: the photo's own message starts over
                photos.stamp(row, **{CLAIM_AT: None})
                continue
            face.landmarks = np.round(aligned.landmarks, 2).tolist()
            face.transform = aligned.alignment.matrix.tolist()
            face.aligned_key = keys[image.id][None]
            face.landmarker = pre.landmarker_name
            face.weights = {**(face.weights or {}), "landmarker": pre.provenance["landmarker_sha256"]}
            face.quality = aligned.quality
            face.measurements = aligned.measurements
            crop_rows += [{"face_id": face.id, "region": r, "object_key": k}
                          for r, k in keys[image.id].items() if r is not None]
            if fused:  # stamped as started: no infer batch of another worker claims it meanwhile
                photos.move(row, ImageStatus.scoring, align_end=now, infer_start=now, infer_by=_node(),
                            **{CLAIM_AT: now})
            else:  # waiting for scoring, claimable by any infer batch
                photos.queue_for_scoring(row)
                photos.stamp(row, align_end=now, **{CLAIM_AT: None})
            out.append((image, aligned))
        if crop_rows:
            stmt = insert(Crop).values(crop_rows)
            session.execute(stmt.on_conflict_do_update(index_elements=["face_id", "region"],
                                                       set_={"object_key": stmt.excluded.object_key}))
    return out


def _score_batch(items: list[tuple[Image, Any]]) -> None:
    """Score aligned faces whose crops are in memory: one forward pass, then each photo's scores."""
    if not items:
        return
    settings = get_settings()
    storage = get_storage()
    ids = [image.id for image, _ in items]
    with session_scope() as session:
        loaded = model_cache().active(session, storage)
        if loaded is None:
            now = time.time()
            for row in _locked(session, ids).values():
                photos.move(row, ImageStatus.awaiting_model, awaiting_model=now, **{CLAIM_AT: None})
            logger.info("images=%s state=awaiting_model", ids)
            return
    member = getattr(loaded.model, "identity", None)
    stack = np.stack([np.stack([aligned.crops[r] for r in loaded.regions]) for _, aligned in items])
    descriptors = None
    if member is not None:
        from shared.ml.encoder import encode

        descriptors = encode(encoder(), np.stack([aligned.chip for _, aligned in items]),
                             precision=settings.infer_precision, flip=member.flip)
    pred = predict(loaded.model, stack, flip_tta=settings.infer_flip_tta, precision=settings.infer_precision,
                   descriptors=descriptors)
    write_scores_many(loaded.version_id, loaded.regions, loaded.classes, loaded.backbone_sha, [
        (image_id, pred.region_probs[k], pred.aggregate[k], pred.features[k], None if descriptors is None else {
            "probs": pred.identity_probs[k], "descriptor": descriptors[k], "feature_key": member.feature_key,
            "ood": pred.ood[k] if pred.ood else None}) for k, image_id in enumerate(ids)])
    if len(ids) > 1:
        logger.info("image=%s state=batch scored=%d", ids[0], len(ids))


def detect(image_id: int | None) -> int | None:
    """Find the main face of this photo and of the photos waiting behind it; reject those without one.

    Returns the id for the next stage, or None when the chain has nothing left to do (the photo is
    gone, rejected, or this worker ran all three stages for the batch).
    """
    if image_id is None:
        return None
    heartbeat(_node(), model_cache().loaded_name)
    image = _enter_detect(image_id)
    if image is None:
        return None
    if image == _PAST:
        return image_id
    from worker.celery_app import fuses_stages

    fused = fuses_stages()
    batch = [image, *claim_for_detection(image_id, get_settings().detect_batch - 1)]
    try:
        detected = _detect_batch(batch, fused)
        if len(batch) > 1:
            logger.info("image=%s state=batch detected=%d of %d", image_id, len(detected), len(batch))
        if not fused:
            return image_id if any(i.id == image_id for i, _, _ in detected) else None
        _score_batch(_align_batch(detected, fused=True))
    except BaseException:
        release_claims([i.id for i in batch])
        raise
    return None


def release_claims(ids: list[int]) -> None:
    """After a failed batch: its photos' own messages may go on at once instead of after the lease."""
    try:
        with session_scope() as session:
            for row in _locked(session, ids).values():
                if (row.stage_times or {}).get(CLAIM_BY) == _claimer():
                    photos.stamp(row, **{CLAIM_AT: None})
    except Exception:  # noqa: BLE001 - the database may be what failed; the lease then runs out
        logger.warning("images=%s state=claims_kept", ids)


def _enter_align(image_id: int) -> Image | str | None:
    """Lock the photo and move it into alignment under this task's claim (see :func:`_enter_detect`).

    A photo without a face (detection's output vanished, or detection never ran) goes back to
    detection: returns ``"detect"``.
    """
    now = time.time()
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if image is None or image.status in photos.FINISHED:
            logger.info("image=%s state=skipped reason=%s", image_id, image.status if image else "deleted")
            return None
        if _claim_live(image, now):
            raise Claimed(image_id, min(1.0, get_settings().claim_lease_seconds))
        if image.status == ImageStatus.scoring.value:
            return _PAST
        if session.scalar(select(Face.id).where(Face.image_id == image_id)) is None:
            photos.move(image, ImageStatus.queued)
            return "detect"
        photos.move(image, ImageStatus.aligning, align_start=now, align_by=_node(),
                    **{CLAIM_AT: now, CLAIM_BY: _claimer()})
        session.flush()
        session.expunge(image)
        return image


def claim_for_alignment(image_id: int, limit: int) -> list[Image]:
    """Other detected photos waiting for alignment that no live batch holds, claimed for this one."""
    if limit <= 0:
        return []
    now = time.time()
    with session_scope() as session:
        rows = session.scalars(
            select(Image).where(Image.status == ImageStatus.aligning.value, Image.id != image_id,
                                Image.stage_times.has_key("detect_end"))
            .order_by(Image.id).limit(limit).with_for_update(skip_locked=True)).all()
        out = []
        for image in rows:
            if _claim_live(image, now):
                continue
            photos.stamp(image, align_start=now, align_by=_node(), batched_with=image_id,
                   **{CLAIM_AT: now, CLAIM_BY: _claimer()})
            out.append(image)
        session.flush()
        for image in out:
            session.expunge(image)
        return out


def align(image_id: int | None) -> int | None:
    """Landmarks, alignment and region crops of the detected face, and of the photos waiting behind it.

    Photos waiting for alignment are claimed (up to ``GESTALT_ALIGN_BATCH`` in all) and their
    landmarks found in one batch; the originals come from this process's decode cache when its
    detect stage decoded them. Returns the id for scoring, or None.
    """
    if image_id is None:
        return None
    heartbeat(_node(), model_cache().loaded_name)
    image = _enter_align(image_id)
    if image is None:
        return None
    if image == _PAST:
        return image_id
    if image == "detect":  # start over; a worker on every queue finishes the photo there
        logger.info("image=%s state=redetect", image_id)
        return align(detect(image_id))
    batch = [image, *claim_for_alignment(image_id, get_settings().align_batch - 1)]
    try:
        with session_scope() as session:
            boxes = {f.image_id: (tuple(f.box), f.rotation or 0.0) for f in session.scalars(
                select(Face).where(Face.image_id.in_([i.id for i in batch])))}
        items, gone = [], []
        for image in batch:
            if image.id not in boxes:
                gone.append(image.id)
                continue
            try:
                rgb = original_rgb(image)
            except ImageRejected as exc:
                photos.reject(image.id, exc.reason)
                continue
            box, rotation = boxes[image.id]
            items.append((image, rgb, Detection(DetectedFace(box, 1.0), 1, rotation)))
        if gone:  # their own messages send them back to detection
            release_claims(gone)
        aligned = _align_batch(items, fused=False)
    except BaseException:
        release_claims([i.id for i in batch])
        raise
    if len(batch) > 1:
        logger.info("image=%s state=batch aligned=%d of %d", image_id, len(aligned), len(batch))
    return image_id if any(i.id == image_id for i, _ in aligned) else None


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
            photos.stamp(image, infer_start=time.time(), infer_by=node, batched_with=image_id)
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
            photos.move(image, ImageStatus.awaiting_model, awaiting_model=time.time())
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
        pool = io_pool()  # the crops' round trips overlap
        grays = {(i, r): pool.submit(lambda k: decode_png_gray(storage.get(k)), crops[i][r])
                 for i in ready for r in loaded.regions}
        chips = {i: pool.submit(lambda k: decode_png_rgb(storage.get(k)), crops[i][CHIP_REGION])
                 for i in ready} if member is not None else {}
        stack = np.stack([np.stack([grays[i, r].result() for r in loaded.regions]) for i in ready])
        descriptors = None
        if member is not None:
            from shared.ml.encoder import encode

            descriptors = encode(encoder(), np.stack([chips[i].result() for i in ready]),
                                 precision=settings.infer_precision, flip=member.flip)
        pred = predict(loaded.model, stack, flip_tta=settings.infer_flip_tta, precision=settings.infer_precision,
                       descriptors=descriptors)
        write_scores_many(loaded.version_id, loaded.regions, loaded.classes, loaded.backbone_sha, [
            (i, pred.region_probs[k], pred.aggregate[k], pred.features[k], None if descriptors is None else {
                "probs": pred.identity_probs[k], "descriptor": descriptors[k], "feature_key": member.feature_key,
                "ood": pred.ood[k] if pred.ood else None}) for k, i in enumerate(ready)])
        if len(ready) > 1:
            logger.info("image=%s state=batch scored=%d", image_id, len(ready))
    # A claimed photo without its crops is left to its own message, which realigns it.
    if image_id not in ready:  # crops lost or never made: redo alignment, which continues here
        logger.info("image=%s state=realign", image_id)
        with session_scope() as session:
            image = session.get(Image, image_id, with_for_update=True)
            if image is None or image.status in photos.FINISHED:
                return None
            photos.move(image, ImageStatus.aligning)
        return infer(align(image_id))
    return image_id


def write_scores(image_id: int, version_id: int, regions: tuple[str, ...], classes: list[dict],
                 region_probs: np.ndarray, aggregate: np.ndarray, backbone: str, features: np.ndarray,
                 identity: dict | None = None) -> None:
    """Member scores, the ranking and (for retraining and the gallery) the features, in one transaction.

    Args:
        identity: the identity member's ``probs``, the face's ``descriptor`` (stored as a feature of
            the encoder under the member's ``feature_key``) and its ``ood`` score; None for a model without that member.
    """
    write_scores_many(version_id, regions, classes, backbone,
                      [(image_id, region_probs, aggregate, features, identity)])


def write_scores_many(version_id: int, regions: tuple[str, ...], classes: list[dict], backbone: str,
                      faces: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, dict | None]]) -> None:
    """:func:`write_scores` for a scored batch, ``(image_id, region_probs, aggregate, features, identity)``
    each, in one transaction (the photos locked in id order)."""
    with session_scope() as session:
        images = {i.id: i for i in session.scalars(
            select(Image).where(Image.id.in_([f[0] for f in faces])).order_by(Image.id).with_for_update())}
        now = time.time()
        for image_id, region_probs, aggregate, features, identity in faces:
            image = images.get(image_id)
            if image is None:
                continue
            store_features(session, image_id, regions, backbone, features)
            rows = [{"image_id": image_id, "model_version_id": version_id, "region": r,
                     "scores": [round(float(p), 6) for p in region_probs[i]]} for i, r in enumerate(regions)]
            if identity is not None:
                store_features(session, image_id, (MEMBER,), identity["feature_key"], identity["descriptor"][None])
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
            photos.move(image, ImageStatus.done, done=now,
                        **({CLAIM_AT: None} if (image.stage_times or {}).get(CLAIM_AT) else {}))
    for image_id, *_ in faces:
        logger.info("image=%s state=done model=%s", image_id, version_id)


def sweep(enqueue_pipeline: Any, enqueue_infer: Any) -> dict[str, int]:
    """Re-queue images whose message was lost, and score images waiting for a model
    (the transitions are :func:`shared.photos.sweep`'s).

    Args:
        enqueue_pipeline: called with an image id to start its whole chain again.
        enqueue_infer: called with an image id to score it.
    """
    settings = get_settings()
    with session_scope() as session:
        to_pipeline, to_infer, failed = photos.sweep(session, settings.requeue_after_seconds,
                                                     settings.give_up_seconds,
                                                     lambda s: active_version(s) is not None)
    # Commit first, then enqueue: a worker must see the rows we just wrote.
    for image_id in to_pipeline:
        enqueue_pipeline(image_id)
    for image_id in to_infer:
        enqueue_infer(image_id)
    if to_pipeline or failed or to_infer:
        logger.info("sweep requeued=%d failed=%d woken=%d", len(to_pipeline), failed, len(to_infer))
    return {"requeued": len(to_pipeline), "failed": failed, "woken": len(to_infer)}

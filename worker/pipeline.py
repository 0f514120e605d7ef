"""The per-image pipeline as plain functions: detect -> align -> infer.

Tasks in ``worker.tasks`` only unpack arguments and call these. Each stage reads
its inputs from the database and the object store, writes its outputs with
upserts (a re-delivered task replaces, never duplicates), and records its state
on the image. Permanent problems reject the image with a reason; transient ones
raise, and the task retries with backoff.

Each stage runs on a batch: the photos waiting behind its own are claimed and go through
with it (:mod:`worker.stages.claims` says how a claim works and what a crash costs). The
batch work is in :mod:`worker.stages`; this module keeps the stages' order and their
hand-overs (a photo without a face goes back to detection, one without crops back to
alignment).
"""
from __future__ import annotations

import logging
from typing import Any

from shared import photos
from shared.config import get_settings
from shared.db import session_scope
from shared.modelops.registry import active_version, gallery_ranked
from shared.models import Image, ImageStatus
from shared.monitoring import heartbeat
from worker.stages.alignment import align_batch, stored_detections
from worker.stages.claims import (
    PAST,
    Claimed,
    claim_for_alignment,
    claim_for_detection,
    claim_waiting,
    enter_align,
    enter_detect,
    release_claims,
)
from worker.stages.detection import detect_batch
from worker.stages.resources import model_cache, node
from worker.stages.scoring import (
    active_model_or_wait,
    return_to_alignment,
    score_batch,
    score_stored,
)

logger = logging.getLogger(__name__)


def _begin(image_id: int, status: ImageStatus, key: str) -> Image | None:
    """Move the image into a stage; None when it no longer exists or the table has no claim from its state."""
    heartbeat(node(), model_cache().loaded_name)
    return photos.enter_stage(image_id, status, key, node())


def detect(image_id: int | None) -> int | None:
    """Find the main face of this photo and of the photos waiting behind it; reject those without one.

    Returns the id for the next stage, or None when the chain has nothing left to do (the photo is
    gone, rejected, or this worker ran all three stages for the batch).
    """
    if image_id is None:
        return None
    heartbeat(node(), model_cache().loaded_name)
    try:
        image = enter_detect(image_id)
    except Claimed:
        # Another worker's batch holds the photo. Rather than send its message again at once (a second message,
        # and often a third), detect a batch of the photos still waiting, then look again: the other batch has
        # usually finished the photo by then. Still held, the message is sent again after the wait (Claimed).
        if not _detect_waiting(image_id):
            raise
        image = enter_detect(image_id)
    if image is None:
        return None
    if image == PAST:
        return image_id
    batch = [image, *claim_for_detection(image_id, get_settings().detect_batch - 1)]
    detected = _run_detection(batch)
    if detected is None:
        return None
    return image_id if any(i.id == image_id for i, _, _ in detected) else None


def _run_detection(batch: list[Image]) -> list | None:
    """Detect a claimed batch; a worker on every queue aligns and scores it too (None then: nothing left to do).
    Returns what was detected (for the next stage) otherwise."""
    from worker.celery_app import fuses_stages

    fused = fuses_stages()
    try:
        detected = detect_batch(batch, fused)
        if len(batch) > 1:
            logger.info("image=%s state=batch detected=%d of %d", batch[0].id, len(detected), len(batch))
        if not fused:
            return detected
        score_batch(align_batch(detected, fused=True))
    except BaseException:
        release_claims([i.id for i in batch])
        raise
    return None


def _detect_waiting(image_id: int) -> bool:
    """Claim and detect (and, fused, finish) a batch of the photos waiting for detection, for the message of
    ``image_id`` while another batch holds that photo. False when none was waiting.

    Each photo of this batch keeps its own message, which continues from wherever the batch left it."""
    batch = claim_for_detection(image_id, get_settings().detect_batch)
    if not batch:
        return False
    logger.info("image=%s state=claimed_elsewhere detecting=%d waiting", image_id, len(batch))
    _run_detection(batch)
    return True


def align(image_id: int | None) -> int | None:
    """Landmarks, alignment and region crops of the detected face, and of the photos waiting behind it.

    Photos waiting for alignment are claimed (up to ``GESTALT_ALIGN_BATCH`` in all) and their
    landmarks found in one batch; the originals come from this process's decode cache when its
    detect stage decoded them. Returns the id for scoring, or None.
    """
    if image_id is None:
        return None
    heartbeat(node(), model_cache().loaded_name)
    image = enter_align(image_id)
    if image is None:
        return None
    if image == PAST:
        return image_id
    if image == "detect":  # start over; a worker on every queue finishes the photo there
        logger.info("image=%s state=redetect", image_id)
        return align(detect(image_id))
    batch = [image, *claim_for_alignment(image_id, get_settings().align_batch - 1)]
    try:
        items, gone = stored_detections(batch)
        if gone:  # their own messages send them back to detection
            release_claims(gone)
        aligned = align_batch(items, fused=False)
    except BaseException:
        release_claims([i.id for i in batch])
        raise
    if len(batch) > 1:
        logger.info("image=%s state=batch aligned=%d of %d", image_id, len(aligned), len(batch))
    return image_id if any(i.id == image_id for i, _ in aligned) else None


def infer(image_id: int | None) -> int | None:
    """Score the crops with the active model; write region scores and the ranking.

    Photos that wait behind this one are claimed (up to ``GESTALT_INFER_BATCH`` in all) and
    scored in the same forward pass. A photo that is not waiting for scoring (finished, failed, or in an
    earlier stage that its own message or the sweep moves on) is left alone. When its crops are lost the
    photo is aligned again here, which raises :class:`Claimed` while another worker's batch holds it (the
    task then sends the alignment and the scoring again, after the wait).
    """
    if image_id is None:
        return None
    if _begin(image_id, ImageStatus.scoring, "infer_start") is None:
        return None
    loaded = active_model_or_wait(image_id)
    if loaded is None:
        return None
    batch = [image_id, *claim_waiting(image_id, get_settings().infer_batch - 1)]
    ready = score_stored(loaded, batch)
    if len(ready) > 1:
        logger.info("image=%s state=batch scored=%d", image_id, len(ready))
    # A claimed photo without its crops is left to its own message, which realigns it.
    if image_id not in ready:  # crops lost or never made: redo alignment, which continues here
        logger.info("image=%s state=realign", image_id)
        if not return_to_alignment(image_id):
            return None
        return infer(align(image_id))
    return image_id


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
                                                     lambda s: active_version(s) is not None, gallery_ranked)
    # Commit first, then enqueue: a worker must see the rows we just wrote.
    for image_id in to_pipeline:
        enqueue_pipeline(image_id)
    for image_id in to_infer:
        enqueue_infer(image_id)
    if to_pipeline or failed or to_infer:
        logger.info("sweep requeued=%d failed=%d woken=%d", len(to_pipeline), failed, len(to_infer))
    return {"requeued": len(to_pipeline), "failed": failed, "woken": len(to_infer)}

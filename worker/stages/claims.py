"""Which photos a batch holds: entering a stage under a claim, claiming the photos waiting behind it, releasing.

A detect task claims the photos waiting for detection behind it (SKIP LOCKED), up to
``GESTALT_DETECT_BATCH`` in all, and runs the detector on them in one batch. A worker that
consumes detect, align and infer (``worker.celery_app.fuses_stages``) carries the batch on
through landmarks, alignment and scoring in one go, handing the decoded photo and the crops
from stage to stage in memory. Each step commits its results for the whole batch in one
transaction, so a crash between steps leaves every photo in a state its own message resumes.

A claimed photo keeps its own queued message. While a batch holds the photo (``claimed_at``
younger than ``GESTALT_CLAIM_LEASE_SECONDS``), that message raises :class:`Claimed` and the
task tries again shortly; once the batch has moved the photo on, the message continues from
wherever the photo is (or stops when it is done). If the batch's worker died, the lease runs
out and the message redoes the stage: a crash costs time, never a photo.
"""
from __future__ import annotations

import logging
import os
import time

from sqlalchemy import select

from shared import photos
from shared.config import get_settings
from shared.db import session_scope
from shared.models import Face, Image, ImageStatus
from worker.stages.resources import node

logger = logging.getLogger("worker.pipeline")  # the pipeline's log lines keep one name, whichever step writes them

CLAIM_AT, CLAIM_BY = "claimed_at", "claimed_by"
# A photo waiting for a model has its face and crops: a late detect or align message for it (a retry
# after Claimed, a redelivery) goes on down the chain instead of detecting or aligning it again.
PAST_ALIGNMENT = (ImageStatus.scoring.value, ImageStatus.awaiting_model.value)
PAST_DETECTION = (ImageStatus.aligning.value, *PAST_ALIGNMENT)
PAST = "past"
# The states a detect or align message acts on (the table's claims into the stage, and the states past it);
# it leaves a photo in any other state alone: finished, failed (an administrator retries it) or gone.
ENTER_DETECT = (*photos.sources(photos.Event.claim, ImageStatus.detecting), *PAST_DETECTION)
ENTER_ALIGN = (*photos.sources(photos.Event.claim, ImageStatus.aligning), *PAST_ALIGNMENT)


class Claimed(Exception):  # noqa: N818 - a state, not an error
    """The photo is held by another worker's batch: its own message tries again after ``wait`` seconds."""

    def __init__(self, image_id: int, wait: float):
        super().__init__(f"image {image_id} is in another worker's batch")
        self.image_id = image_id
        self.wait = wait


def claimer() -> str:
    return f"{node()}:{os.getpid()}"


def claim_live(image: Image, now: float) -> bool:
    """Whether another process's batch holds the photo (this process runs one task at a time)."""
    times = image.stage_times or {}
    at = times.get(CLAIM_AT)
    return at is not None and now - float(at) < get_settings().claim_lease_seconds and \
        times.get(CLAIM_BY) != claimer()


def locked(session, ids: list[int], expected: ImageStatus, writer: str) -> dict[int, Image]:
    """The batch's photos, locked, that still exist and are still in ``expected`` (the state this batch claimed
    them in), by id; each photo that has left it (cancelled, swept, deleted, moved on by another worker) is
    skipped with a log line saying what was found (:func:`shared.photos.still_in`)."""
    rows = {i.id: i for i in session.scalars(
        select(Image).where(Image.id.in_(ids)).order_by(Image.id).with_for_update())}
    return {i: rows[i] for i in ids if photos.still_in(rows.get(i), i, (expected.value,), writer)}


def reject_in(image: Image, reason: str, now: float) -> None:
    photos.move(image, ImageStatus.rejected, photos.Event.reject, reason, rejected=now, **{CLAIM_AT: None})
    logger.info("image=%s state=rejected reason=%r", image.id, reason)


def enter_detect(image_id: int) -> Image | str | None:
    """Lock the photo and move it into detection, under this task's claim.

    Returns the photo (detached), ``PAST`` when it is already past detection (its chain goes on),
    or None when it is gone or final. Raises :class:`Claimed` while another batch holds it.
    """
    now = time.time()
    # Most messages under load belong to photos a batch already finished: a plain read outside a transaction
    # tells, without locking the row (a lock makes the transaction a write that PostgreSQL must log and flush).
    status = photos.status_of(image_id)
    if status not in ENTER_DETECT:
        photos.skipped(image_id, "detect", ENTER_DETECT, status)
        return None
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if not photos.still_in(image, image_id, ENTER_DETECT, "detect"):
            return None
        if claim_live(image, now):
            raise Claimed(image_id, min(1.0, get_settings().claim_lease_seconds))
        if image.status in PAST_DETECTION:
            return PAST
        photos.move(image, ImageStatus.detecting, photos.Event.claim, detect_start=now, detect_by=node(),
                    **{CLAIM_AT: now, CLAIM_BY: claimer()})
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
            if claim_live(image, now):
                continue
            photos.move(image, ImageStatus.detecting, photos.Event.claim, detect_start=now, detect_by=node(),
                        batched_with=image_id, **{CLAIM_AT: now, CLAIM_BY: claimer()})
            out.append(image)
        session.flush()
        for image in out:
            session.expunge(image)
        return out


def enter_align(image_id: int) -> Image | str | None:
    """Lock the photo and move it into alignment under this task's claim (see :func:`enter_detect`).

    A photo without a face (detection's output vanished, or detection never ran) goes back to
    detection: returns ``"detect"``.
    """
    now = time.time()
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if not photos.still_in(image, image_id, ENTER_ALIGN, "align"):
            return None
        if claim_live(image, now):
            raise Claimed(image_id, min(1.0, get_settings().claim_lease_seconds))
        if image.status in PAST_ALIGNMENT:
            return PAST
        if session.scalar(select(Face.id).where(Face.image_id == image_id)) is None:
            if image.status != ImageStatus.queued.value:
                photos.move(image, ImageStatus.queued, photos.Event.redo)
            return "detect"
        photos.move(image, ImageStatus.aligning, photos.Event.claim, align_start=now, align_by=node(),
                    **{CLAIM_AT: now, CLAIM_BY: claimer()})
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
            if claim_live(image, now):
                continue
            photos.stamp(image, align_start=now, align_by=node(), batched_with=image_id,
                         **{CLAIM_AT: now, CLAIM_BY: claimer()})
            out.append(image)
        session.flush()
        for image in out:
            session.expunge(image)
        return out


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
        stamped_by = node()
        for image in rows:
            photos.stamp(image, infer_start=time.time(), infer_by=stamped_by, batched_with=image_id)
        return [image.id for image in rows]


def release_claims(ids: list[int]) -> None:
    """After a failed batch: its photos' own messages may go on at once instead of after the lease."""
    try:
        with session_scope() as session:
            for row in session.scalars(select(Image).where(Image.id.in_(ids)).order_by(Image.id).with_for_update()):
                if (row.stage_times or {}).get(CLAIM_BY) == claimer():
                    photos.stamp(row, **{CLAIM_AT: None})
    except Exception:  # noqa: BLE001 - the database may be what failed; the lease then runs out
        logger.warning("images=%s state=claims_kept", ids)

"""A photo's state machine: every change of an ``Image``'s status goes through this module.

```
queued -> detecting -> aligning -> scoring -> done
   ^          |            |          |   \\-> awaiting_model (no active model) -> scoring (on activation)
   |          +------------+----------+--> rejected (no usable face, cancelled)  [finished]
   +-- sweep (message lost), retry, rescore   failed (retries exhausted, gave up) -> queued (retry)
```

The workers (``worker.pipeline``) move photos through the stages; the portal and the CLI retry,
cancel and rescore them; the sweep re-queues photos whose message was lost and wakes the ones
waiting for a model. Functions that take an ``Image`` change the row in the caller's open
transaction (the caller commits, then sends the message through :mod:`shared.dispatch`, so a
worker always sees the row it is asked about); functions that take an id open their own.
Each transition also stamps ``stage_times`` (when, and by which worker), which the admin
console's latencies and the claims of batched stages read.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.db import session_scope
from shared.models import Image, ImageStatus
from shared.models.cases import ACTIVE_STATES

logger = logging.getLogger(__name__)

# A photo in one of these is finished: nothing will process it again unless it is rescored.
FINISHED = (ImageStatus.done.value, ImageStatus.rejected.value)
# In one of these a message (or a batch holding the photo) is on its way; the sweep re-queues it if not.
ACTIVE = ACTIVE_STATES
# stage_times keys of a scoring attempt, dropped when the photo waits for scoring again.
SCORING_STAMPS = ("infer_start", "infer_by", "batched_with")
REASON_LENGTH = 500


def stamp(image: Image, **times: float | str | None) -> None:
    """Record stage times (and claim fields) on a photo without changing its status."""
    image.stage_times = {**(image.stage_times or {}), **times}


def move(image: Image, status: ImageStatus, reason: str | None = None, **times: float | str | None) -> None:
    """Set a photo's status (and the reason, for rejected and failed photos) and stamp ``times``."""
    image.status = status.value
    if status in (ImageStatus.rejected, ImageStatus.failed):
        image.reason = (reason or "")[:REASON_LENGTH]
    elif status in (ImageStatus.queued, ImageStatus.done):
        image.reason = None
    if times:
        stamp(image, **times)


def enter_stage(image_id: int, status: ImageStatus, key: str, node: str | None) -> Image | None:
    """Move a photo into a stage (``key`` is e.g. ``detect_start``; its ``_by`` twin records ``node``).

    Returns the row, detached; None when the photo no longer exists or is already finished.
    """
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if image is None:
            logger.info("image=%s state=skipped reason=deleted", image_id)
            return None
        if image.status in FINISHED:
            logger.info("image=%s state=skipped reason=%s", image_id, image.status)
            return None
        move(image, status, **{key: time.time(), key.replace("_start", "_by"): node})
        session.flush()
        session.expunge(image)
        return image


def reject(image_id: int, reason: str) -> None:
    """A permanent problem (no usable face, an unreadable photo): the photo ends as ``rejected``."""
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if image is not None:
            move(image, ImageStatus.rejected, reason, rejected=time.time())
    logger.info("image=%s state=rejected reason=%r", image_id, reason)


def note_retry(image_id: int, error: str) -> None:
    """A transient error: the task retries; the photo keeps its status and counts the retry."""
    with session_scope() as session:
        image = session.get(Image, image_id)
        if image is not None:
            stamp(image, retries=int((image.stage_times or {}).get("retries", 0)) + 1, last_error=error)


def mark_failed(image_id: int, reason: str) -> None:
    """Retries exhausted: the photo is ``failed`` (an administrator can retry it)."""
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if image is not None and image.status not in FINISHED:
            move(image, ImageStatus.failed, reason, failed=time.time())
    logger.warning("image=%s state=failed reason=%r", image_id, reason)


def queue_for_scoring(image: Image) -> None:
    """Mark a photo as waiting for scoring, claimable by any infer batch."""
    move(image, ImageStatus.scoring)
    image.stage_times = {k: v for k, v in (image.stage_times or {}).items() if k not in SCORING_STAMPS}


def cancel(image: Image, reason: str = "processing was cancelled by an administrator") -> None:
    """Stop a photo's processing for good: it ends as ``rejected`` with ``reason`` (its messages then skip it)."""
    move(image, ImageStatus.rejected, reason)


def queue_again(image: Image) -> None:
    """Send a photo through its whole chain again (a retry after a failure, or a rescore without crops)."""
    move(image, ImageStatus.queued)


def sweep(session: Session, requeue_after: float, give_up_after: float,
          model_active: Callable[[Session], bool]) -> tuple[list[int], list[int], int]:
    """The sweep's database half, in the caller's transaction (commit, then send the messages).

    Photos in an active state untouched for ``requeue_after`` seconds lost their message: they are
    queued again, or ``failed`` once older than ``give_up_after``. Photos waiting for a model are
    queued for scoring when ``model_active`` says a model is active.

    Returns: (ids to send through the whole chain, ids to score, how many gave up).
    """
    now = time.time()
    to_pipeline: list[int] = []
    to_infer: list[int] = []
    failed = 0
    stale = session.scalars(select(Image).where(Image.status.in_(ACTIVE), Image.updated_at.isnot(None))
                            .with_for_update(skip_locked=True))
    for image in stale:
        if image.updated_at.timestamp() > now - requeue_after:
            continue
        if image.created_at.timestamp() < now - give_up_after:
            move(image, ImageStatus.failed, f"processing did not finish within {int(give_up_after) // 3600} hours")
            failed += 1
            continue
        move(image, ImageStatus.queued, sweeps=int((image.stage_times or {}).get("sweeps", 0)) + 1)
        to_pipeline.append(image.id)
    if model_active(session):
        waiting = session.scalars(select(Image).where(Image.status == ImageStatus.awaiting_model.value)
                                  .with_for_update(skip_locked=True))
        for image in waiting:
            # "scoring" is an active state: if this message is lost, the stale sweep re-runs it.
            queue_for_scoring(image)
            to_infer.append(image.id)
    return to_pipeline, to_infer, failed

"""A photo's state machine: every change of an ``Image``'s status goes through this module.

:data:`TRANSITIONS` below is the whole protocol: each row is a state, the event that moves a photo
out of it and the state it moves to. :func:`move` takes the event and raises
:class:`IllegalTransition` (naming the photo, both states and the event) for any move the table
does not hold. The table, as generated from :data:`TRANSITIONS`, is at the end of this docstring.

The workers (``worker.pipeline``) move photos through the stages; the portal (and the API)
retries, cancels and rescores them; the sweep re-queues photos whose message was lost and wakes the
ones waiting for a model. Every writer locks the photo's row first. A late writer (a batch that
claimed photos a while ago) checks that each photo is still in the state it claimed and skips,
with a log line saying what it found, a photo that has left it: a photo an administrator cancelled
while its batch was scored stays cancelled, and a deleted one is not logged as done.

Functions that take an ``Image`` change the row in the caller's open transaction (the caller
commits, then sends the message through :mod:`shared.dispatch`, so a worker always sees the row it
is asked about); functions that take an id open their own. Each transition also stamps
``stage_times`` (when, and by which worker), which the admin console's latencies and the claims
of batched stages read.
"""
from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Iterable

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from shared.db import read_scalar, session_scope
from shared.models import Image, ImageStatus
from shared.models.cases import ACTIVE_STATES

logger = logging.getLogger(__name__)


class Event(enum.StrEnum):
    """What moves a photo (the events of :data:`TRANSITIONS`)."""

    upload = "upload"  # the portal or an import stores the photo
    claim = "claim"  # a stage's message (or a batch) takes the photo into its stage
    detect = "detect"  # detection found the main face
    align = "align"  # landmarks, the quality gate and the crops are stored
    score = "score"  # the model's scores are written
    reject = "reject"  # a permanent problem: no usable face, an unreadable photo
    redo = "redo"  # a stage's input is gone (the face, the crops): back to the stage that makes it
    no_model = "no_model"  # scoring found no active model
    model_activated = "model_activated"  # the sweep wakes a photo waiting for a model
    cancel = "cancel"  # an administrator stops the photo's processing for good
    rescore = "rescore"  # a clinician asks for the active model's scores again
    retry = "retry"  # an administrator sends a failed photo through again
    sweep = "sweep"  # the photo's message was lost: the sweep queues it again
    give_up = "give_up"  # retries exhausted, or the sweep's time limit passed


_S, _E = ImageStatus, Event
# In one of these a message (or a batch holding the photo) is on its way; the sweep re-queues it if not.
ACTIVE = ACTIVE_STATES
RUNNING = tuple(ImageStatus(s) for s in ACTIVE)

# (state, event, next state); None is a photo not stored yet.
TRANSITIONS: frozenset[tuple[ImageStatus | None, Event, ImageStatus]] = frozenset({
    (None, _E.upload, _S.queued),
    # A message or a batch takes the photo into its stage; the same stage again once a dead batch's lease ran out.
    (_S.queued, _E.claim, _S.detecting), (_S.detecting, _E.claim, _S.detecting),
    (_S.queued, _E.claim, _S.aligning), (_S.detecting, _E.claim, _S.aligning), (_S.aligning, _E.claim, _S.aligning),
    (_S.scoring, _E.claim, _S.scoring), (_S.awaiting_model, _E.claim, _S.scoring),
    (_S.detecting, _E.detect, _S.aligning),
    (_S.aligning, _E.align, _S.scoring),
    (_S.scoring, _E.score, _S.done),
    (_S.detecting, _E.reject, _S.rejected), (_S.aligning, _E.reject, _S.rejected),
    (_S.detecting, _E.redo, _S.queued), (_S.aligning, _E.redo, _S.queued), (_S.scoring, _E.redo, _S.aligning),
    (_S.scoring, _E.no_model, _S.awaiting_model),
    (_S.awaiting_model, _E.model_activated, _S.scoring),
    # A photo ranked by the gallery model alone is scored again once a trained model is active.
    (_S.done, _E.model_activated, _S.scoring),
    *((s, _E.cancel, _S.rejected) for s in (*RUNNING, _S.awaiting_model, _S.failed)),
    # With its crops stored the photo goes straight to scoring, else through the whole chain.
    *((s, _E.rescore, t) for s in (_S.done, _S.awaiting_model, _S.failed) for t in (_S.scoring, _S.queued)),
    (_S.failed, _E.retry, _S.queued),
    *((s, _E.sweep, _S.queued) for s in RUNNING),
    *((s, _E.give_up, _S.failed) for s in (*RUNNING, _S.awaiting_model)),
})
# stage_times keys of a scoring attempt, dropped when the photo waits for scoring again.
SCORING_STAMPS = ("infer_start", "infer_by", "batched_with")
REASON_LENGTH = 500


class IllegalTransition(RuntimeError):
    """A move the table does not hold."""

    def __init__(self, image_id: int | None, source: str | None, event: Event, target: ImageStatus):
        super().__init__(f"photo {image_id}: {event.value} may not move it from {source or '(new)'} to "
                         f"{target.value}")
        self.image_id, self.source, self.event, self.target = image_id, source, event, target


def allows(state: str | None, event: Event, target: ImageStatus | None = None) -> bool:
    """Whether ``event`` may move a photo in ``state`` (to ``target``, when given)."""
    source = ImageStatus(state) if state is not None else None
    return any(s == source and e == event and (target is None or t == target) for s, e, t in TRANSITIONS)


def sources(event: Event, target: ImageStatus) -> tuple[str, ...]:
    """The states from which ``event`` moves a photo to ``target``."""
    return tuple(sorted(s.value for s, e, t in TRANSITIONS if e == event and t == target and s is not None))


def table_text() -> str:
    """The table, one row per transition, grouped by state in the order of :class:`ImageStatus`."""
    order = {None: -1, **{s: i for i, s in enumerate(ImageStatus)}}
    events = list(Event)
    rows = sorted(TRANSITIONS, key=lambda r: (order[r[0]], events.index(r[1]), order[r[2]]))
    lines = [f"{'state':<16}{'event':<17}next state", f"{'-' * 15} {'-' * 16} {'-' * 14}"]
    lines += [f"{(s.value if s else '(new)'):<16}{e.value:<17}{t.value}" for s, e, t in rows]
    return "\n".join(lines)


def stamp(image: Image, **times: float | str | None) -> None:
    """Record stage times (and claim fields) on a photo without changing its status."""
    image.stage_times = {**(image.stage_times or {}), **times}


def move(image: Image, status: ImageStatus, event: Event, reason: str | None = None,
         **times: float | str | None) -> None:
    """Move a locked photo to ``status`` on ``event`` (and set the reason, for rejected and failed photos) and
    stamp ``times``. Raises :class:`IllegalTransition` for a move that :data:`TRANSITIONS` does not hold."""
    if not allows(image.status, event, status):
        raise IllegalTransition(image.id, image.status, event, status)
    image.status = status.value
    if status in (ImageStatus.rejected, ImageStatus.failed):
        image.reason = (reason or "")[:REASON_LENGTH]
    elif status in (ImageStatus.queued, ImageStatus.done):
        image.reason = None
    if times:
        stamp(image, **times)


_STATUS = select(Image.status).where(Image.id == bindparam("image_id"))


def status_of(image_id: int) -> str | None:
    """The photo's status as last committed, without a lock or a transaction; None when it does not exist. A
    message reads it first: most under load belong to photos that a batch already finished."""
    return read_scalar(_STATUS, image_id=image_id)


def still_in(image: Image | None, image_id: int, states: Iterable[str], writer: str) -> bool:
    """A late writer's check on a photo it locked: whether it still exists and is in one of ``states`` (the state
    the writer claimed it in). Otherwise the skip is logged with what the writer found."""
    states = tuple(states)
    if image is not None and image.status in states:
        return True
    skipped(image_id, writer, states, image.status if image is not None else None)
    return False


def skipped(image_id: int, writer: str, expected: Iterable[str], found: str | None) -> None:
    """Log that ``writer`` left a photo alone: it expected one of ``expected`` and found ``found`` (None: deleted)."""
    logger.info("image=%s state=skipped by=%s expected=%s found=%s", image_id, writer, "|".join(expected),
                found or "deleted")


def enter_stage(image_id: int, status: ImageStatus, key: str, node: str | None) -> Image | None:
    """A message takes the photo into a stage (``key`` is e.g. ``infer_start``; its ``_by`` twin records ``node``).

    Returns the row, detached; None (logged) when the photo no longer exists or the table has no claim from
    its state into ``status`` (it is finished, failed, or in an earlier stage that its own message moves on).
    """
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if not still_in(image, image_id, sources(Event.claim, status), f"claim:{status.value}"):
            return None
        move(image, status, Event.claim, **{key: time.time(), key.replace("_start", "_by"): node})
        session.flush()
        session.expunge(image)
        return image


def reject(image_id: int, reason: str, expected: ImageStatus) -> None:
    """A permanent problem (no usable face, an unreadable photo): the photo, still in ``expected``, ends as
    ``rejected``."""
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if not still_in(image, image_id, (expected.value,), "reject"):
            return
        move(image, ImageStatus.rejected, Event.reject, reason, rejected=time.time())
    logger.info("image=%s state=rejected reason=%r", image_id, reason)


def note_retry(image_id: int, error: str) -> None:
    """A transient error: the task retries; the photo keeps its status and counts the retry."""
    with session_scope() as session:
        image = session.get(Image, image_id)
        if image is not None:
            stamp(image, retries=int((image.stage_times or {}).get("retries", 0)) + 1, last_error=error)


def mark_failed(image_id: int, reason: str) -> None:
    """Retries exhausted: the photo is ``failed`` (an administrator can retry it), unless it has left the states
    the table lets give up (finished, failed already, or deleted: logged)."""
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if not still_in(image, image_id, (s.value for s, e, _ in TRANSITIONS if e == Event.give_up), "give_up"):
            return
        move(image, ImageStatus.failed, Event.give_up, reason, failed=time.time())
    logger.warning("image=%s state=failed reason=%r", image_id, reason)


def _wait_for_scoring(image: Image, event: Event) -> None:
    """Mark a photo as waiting for scoring, claimable by any infer batch."""
    move(image, ImageStatus.scoring, event)
    image.stage_times = {k: v for k, v in (image.stage_times or {}).items() if k not in SCORING_STAMPS}


def aligned(image: Image, **times: float | str | None) -> None:
    """Alignment stored the crops: the photo waits for scoring, claimable by any infer batch."""
    _wait_for_scoring(image, Event.align)
    stamp(image, **times)


def wake(image: Image) -> None:
    """A model is active: a photo that waited for one waits for scoring."""
    _wait_for_scoring(image, Event.model_activated)


def cancel(image: Image, reason: str = "processing was cancelled by an administrator") -> None:
    """Stop a photo's processing for good: it ends as ``rejected`` with ``reason`` (its messages then skip it)."""
    move(image, ImageStatus.rejected, Event.cancel, reason, cancelled=time.time())


def retry(image: Image) -> None:
    """Send a failed photo through its whole chain again."""
    move(image, ImageStatus.queued, Event.retry)


def rescore(image: Image) -> None:
    """Score the photo again with the active model: straight away (``scoring``) with its crops stored, else
    through the whole chain (``queued``). The caller sends the message its new status asks for."""
    if image.face is not None and image.face.crops:
        _wait_for_scoring(image, Event.rescore)
    else:
        move(image, ImageStatus.queued, Event.rescore)


def lock(session: Session, image_id: int) -> Image | None:
    """The photo, read afresh under its row lock (a worker may be moving it), for the portal's actions."""
    return session.get(Image, image_id, with_for_update=True, populate_existing=True)


def sweep(session: Session, requeue_after: float, give_up_after: float,
          model_active: Callable[[Session], bool],
          rescorable: Callable[[Session], Iterable[Image]] | None = None) -> tuple[list[int], list[int], int]:
    """The sweep's database half, in the caller's transaction (commit, then send the messages).

    Photos in an active state untouched for ``requeue_after`` seconds lost their message: they are
    queued again, or ``failed`` once older than ``give_up_after``. Photos waiting for a model are
    queued for scoring when ``model_active`` says a model is active, and so are the finished photos
    ``rescorable`` names (locked: the photos the gallery model alone ranked, once a trained model is active).

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
            move(image, ImageStatus.failed, Event.give_up,
                 f"processing did not finish within {int(give_up_after) // 3600} hours")
            failed += 1
            continue
        move(image, ImageStatus.queued, Event.sweep, sweeps=int((image.stage_times or {}).get("sweeps", 0)) + 1)
        to_pipeline.append(image.id)
    if model_active(session):
        waiting = session.scalars(select(Image).where(Image.status == ImageStatus.awaiting_model.value)
                                  .with_for_update(skip_locked=True))
        for image in waiting:
            # "scoring" is an active state: if this message is lost, the stale sweep re-runs it.
            wake(image)
            to_infer.append(image.id)
        for image in rescorable(session) if rescorable is not None else ():
            _wait_for_scoring(image, Event.model_activated)
            to_infer.append(image.id)
    return to_pipeline, to_infer, failed


__doc__ += "\nThe transitions (``TRANSITIONS``):\n\n```\n" + table_text() + "\n```\n"

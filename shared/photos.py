"""Transitions of a photo's status that the portal and the CLI make (the workers' own are in worker/pipeline).

Each function changes the row in the caller's open transaction; the caller commits, then sends
the message (:mod:`shared.dispatch`), so that a worker always sees the row it is asked about.
"""
from __future__ import annotations

from shared.models import Image, ImageStatus


def queue_for_scoring(image: Image) -> None:
    """Mark a photo as waiting for scoring, claimable by any infer batch (as worker.pipeline does)."""
    image.status = ImageStatus.scoring.value
    image.stage_times = {k: v for k, v in (image.stage_times or {}).items()
                         if k not in ("infer_start", "infer_by", "batched_with")}


# A photo in one of these is finished: nothing will process it again unless it is rescored.
FINISHED = (ImageStatus.done.value, ImageStatus.rejected.value)


def cancel(image: Image, reason: str = "processing was cancelled by an administrator") -> None:
    """Stop a photo's processing for good: it ends as ``rejected`` with ``reason`` (its messages then skip it)."""
    image.status = ImageStatus.rejected.value
    image.reason = reason


def queue_again(image: Image) -> None:
    """Send a photo through its whole chain again (a retry after a failure, or a rescore without crops)."""
    image.status = ImageStatus.queued.value
    image.reason = None

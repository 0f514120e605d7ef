"""detect -> align -> infer, one chain per image, each stage on its own queue."""
from __future__ import annotations

import logging

import urllib3.exceptions
from celery import Task, chain
from minio.error import MinioException
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy.exc import InterfaceError, OperationalError

from shared import photos
from worker import pipeline
from worker.celery_app import app
from worker.stages import claims

logger = logging.getLogger(__name__)

# Engines that are down or restarting: retry with backoff.
TRANSIENT = (OperationalError, InterfaceError, MinioException, urllib3.exceptions.HTTPError,
             RedisConnectionError, ConnectionError, TimeoutError)


class PipelineTask(Task):
    # Chains pass values through the broker; storing results would add Redis writes for nothing.
    ignore_result = True
    autoretry_for = TRANSIENT
    retry_backoff = 2
    retry_backoff_max = 60
    retry_jitter = True
    max_retries = 10

    def on_retry(self, exc, task_id, args, kwargs, einfo):
        if args and args[0] is not None:
            try:
                photos.note_retry(args[0], f"{type(exc).__name__}: {exc}"[:200])
            except Exception:  # noqa: BLE001 - the database may be the thing that is down
                logger.warning("image=%s state=retry_unrecorded", args[0])

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        image_id = args[0] if args else None
        if image_id is None:
            return
        if isinstance(exc, TRANSIENT):
            reason = f"{self.name.split('.')[-1]} failed after {self.max_retries} retries: services unavailable"
        else:
            reason = f"internal error during {self.name.split('.')[-1]} ({type(exc).__name__})"
        try:
            photos.mark_failed(image_id, reason)
        except Exception:  # noqa: BLE001 - the database may be the thing that is down
            logger.exception("image=%s state=unrecorded_failure", image_id)


def _last_if_none(task: Task, image_id: int | None) -> int | None:
    """None means the photo needs nothing more (gone, final, or the batch ran every stage): the rest of the
    chain is not sent, which saves a message and a task per stage."""
    if image_id is None:
        task.request.chain = None
    return image_id


@app.task(name="pipeline.detect", base=PipelineTask, bind=True)
def detect(self, image_id: int | None) -> int | None:
    try:
        return _last_if_none(self, pipeline.detect(image_id))
    except claims.Claimed as exc:
        # Another worker's batch holds the photo: look again shortly, with the rest of the chain. A new
        # message, not a retry: the wait must not use up the retries that engine outages need.
        return self.replace(detect.si(image_id).set(countdown=exc.wait))


@app.task(name="pipeline.align", base=PipelineTask, bind=True)
def align(self, image_id: int | None) -> int | None:
    try:
        return _last_if_none(self, pipeline.align(image_id))
    except claims.Claimed as exc:
        return self.replace(align.si(image_id).set(countdown=exc.wait))


@app.task(name="pipeline.infer", base=PipelineTask, bind=True)
def infer(self, image_id: int | None) -> int | None:
    try:
        return pipeline.infer(image_id)
    except claims.Claimed as exc:
        # Realigning a photo whose crops were lost, and another worker's batch holds it: align again after the
        # wait, then score. A new message, never a failure and never one of the retries engine outages need.
        return self.replace(chain(align.si(image_id).set(countdown=exc.wait), infer.s()))


def enqueue_image(image_id: int) -> None:
    """Start the whole chain for one image (after its row is committed)."""
    chain(detect.si(image_id), align.s(), infer.s()).apply_async()


def enqueue_infer(image_id: int) -> None:
    infer.apply_async((image_id,))

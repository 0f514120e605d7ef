"""Sending work to the Celery workers by task name, for the CLI and the portal.

The callers never import ``worker.*`` (the tasks, torch, the model cache): a message names its
task and queue, as ``worker.celery_app``'s routes do, and whichever worker listens on that queue
runs it. Messages are JSON, the only content the workers accept.
"""
from __future__ import annotations

import threading
from typing import Any

from celery import Celery, chain
from celery.result import AsyncResult
from sqlalchemy import func, select

from shared import queues
from shared.config import get_settings
from shared.db import session_scope
from shared.models import Image, ImageStatus

# Task name -> queue; the same routes as worker.celery_app.CeleryConfig.task_routes.
SWEEP = ("maintenance.sweep", "default")
RETRAIN = ("retrain.nightly", "train")

_client: Celery | None = None
_lock = threading.Lock()


def _celery() -> Celery:
    """A producer-only Celery app on the configured broker (no tasks registered)."""
    global _client
    with _lock:
        if _client is None:
            settings = get_settings()
            app = Celery("gestalt-client", broker=settings.redis_url, backend=settings.redis_url)
            app.conf.update(task_serializer="json", accept_content=["json"], result_expires=3600,
                            broker_transport_options={"visibility_timeout": settings.visibility_timeout},
                            broker_connection_retry_on_startup=True)
            _client = app
        return _client


def send(task: tuple[str, str], *args: Any, **kwargs: Any) -> AsyncResult:
    """Queue ``task`` (its name and queue) with these arguments."""
    name, queue = task
    return _celery().send_task(name, args=args, kwargs=kwargs, queue=queue)


def enqueue_photo(image_id: int) -> None:
    """Start a stored photo's whole chain, detect -> align -> infer (after its row is committed)."""
    app = _celery()
    chain(app.signature("pipeline.detect", args=(image_id,), immutable=True, queue=queues.DETECT),
          app.signature("pipeline.align", queue=queues.ALIGN),
          app.signature("pipeline.infer", queue=queues.INFER)).apply_async()


def enqueue_scoring(image_id: int) -> None:
    """Score a photo whose crops are stored (its status already says it waits for scoring)."""
    _celery().send_task("pipeline.infer", args=(image_id,), queue=queues.INFER)


def ping_workers(timeout: float = 1.0) -> dict:
    """The workers that answer within ``timeout`` seconds ({node: reply}); empty when the broker is down."""
    try:
        return _celery().control.inspect(timeout=timeout).ping() or {}
    except Exception:  # noqa: BLE001 - a down broker is shown, not raised
        return {}


def wake_waiting_photos() -> int:
    """After a model is activated: photos that wait for a model are scored by a worker's sweep.

    Returns how many photos were waiting; no message is sent (and no broker needed) when none was.
    """
    with session_scope() as session:
        waiting = session.scalar(select(func.count()).select_from(Image)
                                 .where(Image.status == ImageStatus.awaiting_model.value)) or 0
    if waiting:
        send(SWEEP)
    return int(waiting)


def queue_retrain(trigger: str, dry_run: bool = False, shuffle_labels: bool = False, kind: str = "heads") -> str:
    """Queue one retraining run on the ``train`` queue; returns the task id."""
    return send(RETRAIN, trigger=trigger, dry_run=dry_run, shuffle_labels=shuffle_labels, kind=kind).id

"""The Celery application; ``celery -A worker.celery_app`` finds it here."""
from __future__ import annotations

import logging
import os

from celery import Celery
from celery.schedules import crontab
from celery.signals import celeryd_after_setup, worker_process_init

from shared import queues
from shared.config import get_settings
from shared.db import dispose_engine
from shared.modelops.registry import set_torch_threads
from shared.storage import reset_storage

logger = logging.getLogger(__name__)

PIPELINE_QUEUES = queues.PIPELINE
ALL_QUEUES = queues.ALL
# The queues this worker consumes (set at start-up, inherited by its processes); None outside a worker.
CONSUMED_QUEUES: frozenset[str] | None = None
# Torch threads for each of this worker's processes (set at start-up from GESTALT_TORCH_THREADS; see
# process_threads); 0 leaves torch's default.
PROCESS_THREADS = 0


class CeleryConfig:
    """Every Celery setting in one place."""

    def __init__(self, redis_url: str | None, visibility_timeout: int, sweep_seconds: float, retrain_cron: str,
                 timezone: str, retrain_full_cron: str = "", task_events: bool = False):
        self.broker_url = redis_url
        self.result_backend = redis_url
        self.result_expires = 3600
        # Long tasks: take one message per process and ack it only when done; a killed
        # worker's message goes back to the queue (tasks are idempotent).
        self.task_acks_late = True
        self.task_reject_on_worker_lost = True
        self.worker_prefetch_multiplier = 1
        # An unacked message is redelivered after this long (Redis has no consumer liveness).
        self.broker_transport_options = {"visibility_timeout": visibility_timeout}
        self.result_backend_transport_options = {"retry_policy": {"timeout": 5.0}}
        self.broker_connection_retry_on_startup = True
        self.task_default_queue = queues.DEFAULT
        self.task_routes = {
            "pipeline.detect": {"queue": queues.DETECT},
            "pipeline.align": {"queue": queues.ALIGN},
            "pipeline.infer": {"queue": queues.INFER},
            "maintenance.*": {"queue": queues.DEFAULT},
            "retrain.*": {"queue": queues.TRAIN},
        }
        self.task_track_started = True
        # Events only for a monitor (Flower enables them on running workers while it runs).
        self.worker_send_task_events = task_events
        self.task_send_sent_event = task_events
        self.task_serializer = "json"
        self.accept_content = ["json"]
        self.timezone = timezone
        self.beat_schedule = {
            "sweep": {"task": "maintenance.sweep", "schedule": sweep_seconds},
            "retention": {"task": "maintenance.retention", "schedule": crontab(minute=30, hour=3)},
            "retrain-nightly": {"task": "retrain.nightly", "schedule": crontab(*retrain_cron.split()),
                                "kwargs": {"trigger": "beat"}},
        }
        if retrain_full_cron:  # optional: a full fine-tune, e.g. weekly
            self.beat_schedule["retrain-full"] = {
                "task": "retrain.nightly", "schedule": crontab(*retrain_full_cron.split()),
                "kwargs": {"trigger": "beat", "kind": "full"}}


def create_celery() -> Celery:
    app = Celery("gestalt", include=["worker.tasks.pipeline", "worker.tasks.maintenance", "worker.tasks.retrain"])
    settings = get_settings()
    app.config_from_object(CeleryConfig(settings.redis_url, settings.visibility_timeout, settings.sweep_seconds,
                                        settings.retrain_cron, settings.timezone, settings.retrain_full_cron,
                                        settings.task_events))
    return app


app = create_celery()


@celeryd_after_setup.connect
def _record_queues(sender, instance, **_kwargs) -> None:
    # A worker that consumes detect, align and infer may run the three stages of a batch in one go.
    global CONSUMED_QUEUES
    CONSUMED_QUEUES = frozenset(instance.app.amqp.queues.consume_from or ())
    logger.info("queues=%s", ",".join(sorted(CONSUMED_QUEUES)))
    from shared.ml.runtime.device import resolve_device, slow_precision

    settings = get_settings()
    device = resolve_device(settings.device)
    warning = slow_precision(device, settings.infer_precision)
    if warning:
        logger.warning(warning)
    global PROCESS_THREADS
    PROCESS_THREADS = process_threads(settings.torch_threads, device.type, instance.concurrency)
    logger.info("processes=%s torch_threads=%s", instance.concurrency, PROCESS_THREADS or "default")


def process_threads(configured: int, device_type: str, processes: int | None) -> int:
    """Torch threads per worker process: ``configured`` when set; on the CPU otherwise the cores shared out
    among the processes (torch's default gives every process every core, and N processes then run N times
    as many threads as there are cores, which costs time in contention); 0 (torch's default) on a GPU."""
    if configured > 0 or device_type != "cpu" or not processes:
        return configured
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // processes)


def fuses_stages() -> bool:
    """Whether this process runs detect, align and infer of a claimed batch in one go (GESTALT_FUSE_STAGES)."""
    mode = get_settings().fuse_stages
    if mode in ("on", "off"):
        return mode == "on"
    return CONSUMED_QUEUES is not None and set(PIPELINE_QUEUES) <= CONSUMED_QUEUES


@worker_process_init.connect
def _init_process(**_kwargs) -> None:
    # A forked child must not share the parent's connections.
    dispose_engine()
    reset_storage()
    set_torch_threads(PROCESS_THREADS or get_settings().torch_threads)

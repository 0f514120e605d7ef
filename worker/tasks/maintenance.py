"""Periodic upkeep run by beat on the default queue."""
from __future__ import annotations

from worker import pipeline
from worker.celery_app import app
from worker.tasks.pipeline import enqueue_image, enqueue_infer


@app.task(name="maintenance.sweep")
def sweep() -> dict[str, int]:
    """Re-queue lost images and score those waiting for a model; sample the queue depths for the console."""
    from shared.monitoring import record_queue_depths

    record_queue_depths()
    return pipeline.sweep(enqueue_image, enqueue_infer)


@app.task(name="maintenance.retention")
def retention() -> dict[str, int]:
    """Delete cases past the retention period, then objects nothing refers to."""
    from shared.config import get_settings
    from shared.db import session_scope
    from shared.lifecycle import apply_retention, collect_orphans
    from shared.storage import get_storage

    with session_scope() as session:
        deleted = apply_retention(session, get_storage(), get_settings().retention_days)
    with session_scope() as session:
        orphans = collect_orphans(session, get_storage())
    return {"cases_deleted": deleted, "orphans_removed": orphans}

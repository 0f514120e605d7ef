"""Periodic upkeep run by beat on the default queue."""
from __future__ import annotations

from worker import pipeline
from worker.celery_app import app
from worker.tasks.pipeline import enqueue_image, enqueue_infer


@app.task(name="maintenance.sweep")
def sweep() -> dict[str, int]:
    """Re-queue lost images and score those waiting for a model."""
    return pipeline.sweep(enqueue_image, enqueue_infer)

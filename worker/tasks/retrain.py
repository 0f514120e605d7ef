"""Retraining on the `train` queue."""
from __future__ import annotations

from shared.modelops.retrain import run_retrain
from worker.celery_app import app


@app.task(name="retrain.nightly", acks_late=True)
def nightly(trigger: str = "beat", dry_run: bool = False, shuffle_labels: bool = False, kind: str = "heads") -> int:
    """Retrain from newly diagnosed cases (heads, or a full fine-tune); returns the TrainingRun id."""
    return run_retrain(trigger, dry_run=dry_run, shuffle_labels=shuffle_labels, kind=kind)

"""Celery workers: the per-image pipeline and periodic maintenance."""

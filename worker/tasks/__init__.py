"""Thin Celery tasks: they unpack arguments and call ``worker.pipeline``."""

"""The Celery queue names, defined once.

The workers' routes (``worker.celery_app``), the CLI and the embedded stack, the admin console's
queue depths and the senders in ``shared.dispatch`` read these; ``tests/test_queues.py`` checks
that docker-compose.yml, the Dockerfile and the Kubernetes manifests name only these queues and
that every one of them has a consumer.
"""
from __future__ import annotations

DETECT, ALIGN, INFER = "detect", "align", "infer"
DEFAULT, TRAIN = "default", "train"
# The per-photo stages, in order: GPU workers consume all three.
PIPELINE = (DETECT, ALIGN, INFER)
# Maintenance (the sweep) and retraining: CPU workers.
SERVICE = (DEFAULT, TRAIN)
ALL = (*PIPELINE, *SERVICE)


def joined(queues: tuple[str, ...]) -> str:
    """The ``-Q`` argument of a worker consuming ``queues``."""
    return ",".join(queues)

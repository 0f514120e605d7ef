"""What the admin console shows: queue depths, recent outcomes, stage latencies, worker heartbeats."""
from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.config import get_settings
from shared.models import Image

QUEUES = ("detect", "align", "infer", "default", "train")
HEARTBEAT_PREFIX = "gestalt:heartbeat:"
HEARTBEAT_TTL = 300
STAGES = (("queue", "uploaded", "detect_start"), ("detect", "detect_start", "detect_end"),
          ("align", "align_start", "align_end"), ("infer", "infer_start", "done"), ("end to end", "uploaded", "done"))


_clients: dict[str, redis.Redis] = {}


def _redis() -> redis.Redis:
    """One client per URL and process (redis-py's pool resets itself after a fork)."""
    url = get_settings().redis_url
    if url not in _clients:
        _clients[url] = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    return _clients[url]


def queue_depths() -> dict[str, int | None]:
    """Messages waiting per queue (None when the broker does not answer)."""
    try:
        client = _redis()
        return {q: int(client.llen(q)) for q in QUEUES}
    except redis.RedisError:
        return dict.fromkeys(QUEUES)


def heartbeat(node: str | None, model: str | None) -> None:
    """Called by worker processes: who is alive and which model version it has loaded."""
    key = f"{HEARTBEAT_PREFIX}{node or 'unknown'}:{os.getpid()}"
    with contextlib.suppress(redis.RedisError):  # monitoring must never fail a task
        _redis().set(key, json.dumps({"node": node, "pid": os.getpid(), "model": model, "at": time.time()}),
                     ex=HEARTBEAT_TTL)


def heartbeats() -> list[dict]:
    try:
        client = _redis()
        keys = list(client.scan_iter(f"{HEARTBEAT_PREFIX}*", count=500))
        values = client.mget(keys) if keys else []
    except redis.RedisError:
        return []
    beats = [json.loads(v) for v in values if v]
    for b in beats:
        b["age"] = time.time() - b["at"]
    return sorted(beats, key=lambda b: (b["node"] or "", b["pid"]))


def recent_activity(session: Session, seconds: float = 3600) -> dict:
    """Counts and per-stage latency p50/p95 over images touched in the last ``seconds``."""
    since = time.time() - seconds
    rows = session.execute(select(Image.status, Image.stage_times).where(
        Image.updated_at >= _utc(since))).all()
    counts = {"running": 0, "succeeded": 0, "rejected": 0, "failed": 0, "retried": 0, "waiting_for_model": 0}
    durations: dict[str, list[float]] = {name: [] for name, _, _ in STAGES}
    for status, times in rows:
        times = times or {}
        if status in ("queued", "detecting", "aligning", "scoring"):
            counts["running"] += 1
        elif status == "done":
            counts["succeeded"] += 1
        elif status == "awaiting_model":
            counts["waiting_for_model"] += 1
        elif status in counts:
            counts[status] += 1
        if times.get("retries") or times.get("sweeps"):
            counts["retried"] += 1
        for name, start, end in STAGES:
            if start in times and end in times and times[end] >= times[start]:
                durations[name].append(times[end] - times[start])
    latency = {name: {"n": len(v), "p50": float(np.percentile(v, 50)) if v else None,
                      "p95": float(np.percentile(v, 95)) if v else None} for name, v in durations.items()}
    return {"counts": counts, "latency": latency}


def _utc(ts: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)

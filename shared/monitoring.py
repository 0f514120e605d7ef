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

from shared import queues
from shared.config import get_settings
from shared.models import Image

QUEUES = queues.ALL
HEARTBEAT_PREFIX = "gestalt:heartbeat:"
HEARTBEAT_TTL = 300
# A process writes its heartbeat at most this often, unless what it reports (node, model) changed.
HEARTBEAT_EVERY = 5.0
STAGES = (("queue", "uploaded", "detect_start"), ("detect", "detect_start", "detect_end"),
          ("align", "align_start", "align_end"), ("infer", "infer_start", "done"), ("end to end", "uploaded", "done"))


_clients: dict[str, redis.Redis] = {}
# What this process last wrote as its heartbeat, and when: (pid, node, model), monotonic seconds.
_last_beat: tuple[tuple[int, str | None, str | None], float] | None = None


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
    """Called by worker processes before each task: who is alive and which model version it has loaded.

    Written at most every ``HEARTBEAT_EVERY`` seconds per process (a busy worker runs many tasks a
    second), and at once when the node or the model changed.
    """
    global _last_beat
    state, now = (os.getpid(), node, model), time.monotonic()
    if _last_beat is not None and _last_beat[0] == state and now - _last_beat[1] < HEARTBEAT_EVERY:
        return
    key = f"{HEARTBEAT_PREFIX}{node or 'unknown'}:{os.getpid()}"
    with contextlib.suppress(redis.RedisError):  # monitoring must never fail a task
        _redis().set(key, json.dumps({"node": node, "pid": os.getpid(), "model": model, "at": time.time()}),
                     ex=HEARTBEAT_TTL)
        _last_beat = (state, now)


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


def _waited(times: dict) -> float:
    """Seconds a photo spent waiting for a model to be activated (0 if it never did)."""
    start, end = times.get("awaiting_model"), times.get("infer_start")
    return max(0.0, end - start) if start is not None and end is not None and end >= start else 0.0


def _durations(times: dict) -> dict[str, float]:
    """Each stage's duration for one photo's ``stage_times``; "end to end" leaves out the wait for a model,
    which is reported on its own."""
    out = {}
    for name, start, end in STAGES:
        if start in times and end in times and times[end] >= times[start]:
            out[name] = times[end] - times[start]
    waited = _waited(times)
    if waited:
        out["waiting for a model"] = waited
        if "end to end" in out:
            out["end to end"] = max(0.0, out["end to end"] - waited)
    return out


LATENCY_ROWS = (*(name for name, _, _ in STAGES), "waiting for a model")


def recent_activity(session: Session, seconds: float = 3600) -> dict:
    """Counts and per-stage latency p50/p95 over images touched in the last ``seconds``."""
    since = time.time() - seconds
    rows = session.execute(select(Image.status, Image.stage_times).where(
        Image.updated_at >= _utc(since))).all()
    counts = {"running": 0, "succeeded": 0, "rejected": 0, "failed": 0, "retried": 0, "waiting_for_model": 0}
    durations: dict[str, list[float]] = {name: [] for name in LATENCY_ROWS}
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
        for name, value in _durations(times).items():
            durations[name].append(value)
    latency = {name: {"n": len(v), "p50": float(np.percentile(v, 50)) if v else None,
                      "p95": float(np.percentile(v, 95)) if v else None} for name, v in durations.items()}
    return {"counts": counts, "latency": latency}


def activity_series(session: Session, hours: float = 6, bucket_minutes: int = 15) -> dict:
    """Per time bucket over the last ``hours``: photos finished, and the p50/p95 of their end-to-end
    processing time (waiting for a model left out), for the admin console's plots."""
    now = time.time()
    width = bucket_minutes * 60
    n = max(1, int(hours * 3600 // width))
    start = now - n * width
    rows = session.scalars(select(Image.stage_times).where(Image.updated_at >= _utc(start))).all()
    done: list[list[float]] = [[] for _ in range(n)]
    for times in rows:
        finished = (times or {}).get("done")
        if finished is None or finished < start:
            continue
        bucket = min(n - 1, int((finished - start) // width))
        done[bucket].append(_durations(times).get("end to end", 0.0))
    return {"t": [start + (i + 1) * width for i in range(n)], "done": [len(b) for b in done],
            "p50": [float(np.percentile(b, 50)) if b else None for b in done],
            "p95": [float(np.percentile(b, 95)) if b else None for b in done], "bucket_minutes": bucket_minutes}


DEPTHS_KEY = "gestalt:queue-depths"
DEPTHS_KEEP_SECONDS = 24 * 3600


def record_queue_depths() -> None:
    """One sample of every queue's depth (beat's sweep calls this); a day of samples is kept."""
    depths = queue_depths()
    if all(v is None for v in depths.values()):
        return
    now = time.time()
    with contextlib.suppress(redis.RedisError):  # monitoring must never fail a task
        client = _redis()
        client.zadd(DEPTHS_KEY, {json.dumps({"t": now, **depths}): now})
        client.zremrangebyscore(DEPTHS_KEY, 0, now - DEPTHS_KEEP_SECONDS)


def depth_history(hours: float = 6) -> list[dict]:
    """The recorded queue-depth samples of the last ``hours``, oldest first."""
    try:
        raw = _redis().zrangebyscore(DEPTHS_KEY, time.time() - hours * 3600, "+inf")
    except redis.RedisError:
        return []
    return [json.loads(r) for r in raw]


def _utc(ts: float):
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)

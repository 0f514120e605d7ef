"""What the benchmark measures: uploads through the portal, per-stage latency, sustained throughput,
and the CPU time and database transactions of every process of the stack."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from shared.stack import Process
from tests.conftest import Portal

STAGES = ("queue", "detect", "align", "infer", "end to end")


# ----- CPU accounting -------------------------------------------------------------------------

def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live descendants, and the children they reaped."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_snapshot(groups: dict[str, list[Process]]) -> dict[str, float]:
    return {name: sum(tree_cpu(p.popen.pid) for p in procs if p.popen is not None)
            for name, procs in groups.items()}


def transactions() -> int:
    from sqlalchemy import text

    from shared.db import session_scope

    with session_scope() as s:
        return int(s.execute(text("select xact_commit + xact_rollback from pg_stat_database "
                                  "where datname = current_database()")).scalar())


# ----- uploads and their photos' progress ---------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def wait_settled(ids: list[int], timeout: float, settled=("done", "rejected", "failed")) -> dict[str, int]:
    from sqlalchemy import func, select

    from shared.db import session_scope
    from shared.models import Image as ImageRow

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as s:
            counts = dict(s.execute(select(ImageRow.status, func.count()).where(ImageRow.id.in_(ids))
                                    .group_by(ImageRow.status)).all())
        if sum(counts.get(k, 0) for k in settled) >= len(ids) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


class Uploader:
    """Uploads the ``i``-th benchmark JPEG into a case through the portal; returns the photo's id."""

    def __init__(self, portal: Portal, token: str, blobs: list[bytes]):
        self.portal, self.token, self.blobs = portal, token, blobs

    def __call__(self, i: int, case_id: int) -> int:
        r = self.portal.upload(case_id, [(f"p{i}.jpg", self.blobs[i])], token=self.token)
        assert r.status_code == 201, r.text
        return r.json()["images"][0]["id"]


# ----- the measurements ---------------------------------------------------------------------------

def single_latencies(upload: Uploader, first: int, count: int, case_id: int) -> dict[str, list[float]]:
    """Seconds each stage took (and end to end) for ``count`` uploads made one at a time, of the photos done."""
    from shared.db import session_scope
    from shared.models import Image as ImageRow

    stages: dict[str, list[float]] = {k: [] for k in STAGES}
    ids = []
    for i in range(count):
        ids.append(upload(first + i, case_id))
        wait_settled(ids[-1:], 300)
    with session_scope() as s:
        for r in s.query(ImageRow).filter(ImageRow.id.in_(ids)).all():
            t = r.stage_times
            if r.status != "done":
                continue
            stages["queue"].append(t["detect_start"] - t["uploaded"])
            stages["detect"].append(t["detect_end"] - t["detect_start"])
            stages["align"].append(t["align_end"] - t["align_start"])
            stages["infer"].append(t["done"] - t["infer_start"])
            stages["end to end"].append(t["done"] - t["uploaded"])
    return stages


@dataclass
class Throughput:
    """A sustained run: photos/s, how many were done, and CPU ms and transactions per photo."""

    uploads: int
    counts: dict[str, int]
    photos_per_s: float
    cpu_ms: dict[str, float]
    transactions: float
    # This script's own CPU per photo (the uploading clients and the polling): it shares the cores with
    # the stack, but is not part of it.
    client_ms: float = 0.0

    @property
    def done(self) -> int:
        return self.counts.get("done", 0)

    @property
    def cpu_total(self) -> float:
        return sum(self.cpu_ms.values())


def sustained(args, upload: Uploader, first: int, cases: list[int], groups: dict[str, list[Process]]) -> Throughput:
    """``args.uploads`` uploads from ``args.upload_threads`` threads, timed until every photo settles.

    With ``--preload`` the photos wait in the detect queue first; the clock starts when the workers
    take it again (the web out of the way)."""
    def upload_all() -> list[int]:
        with ThreadPoolExecutor(args.upload_threads) as pool:
            return list(pool.map(lambda i: upload(first + i, cases[2 + i // 4 % (len(cases) - 2)]),
                                 range(args.uploads)))

    if getattr(args, "profile", None):  # the worker processes' profiles start over here
        args.profile.mkdir(parents=True, exist_ok=True)
        (args.profile / "start").touch()
    if args.preload:
        from worker.celery_app import app as celery_app

        celery_app.control.cancel_consumer("detect", reply=True, timeout=5)
        ids = upload_all()
        xact0, cpu0 = transactions(), cpu_snapshot(groups)
        start, client0 = time.monotonic(), time.process_time()
        celery_app.control.add_consumer("detect", reply=True, timeout=5)
    else:
        xact0, cpu0 = transactions(), cpu_snapshot(groups)
        start, client0 = time.monotonic(), time.process_time()
        ids = upload_all()
    counts = wait_settled(ids, 1800)
    elapsed, client = time.monotonic() - start, time.process_time() - client0
    cpu1, xact1 = cpu_snapshot(groups), transactions()
    if getattr(args, "profile", None):
        flush_profiles(args.concurrency)
    return Throughput(len(ids), counts, len(ids) / elapsed, {k: 1000 * (cpu1[k] - cpu0[k]) / len(ids) for k in cpu0},
                      (xact1 - xact0) / len(ids), 1000 * client / len(ids))


def flush_profiles(processes: int) -> None:
    """After the measurement: a few empty detect messages, so that each worker process writes its profile once more
    (a process writes it after a task, at most every second; the run's last tasks would otherwise be missing)."""
    from shared import dispatch

    time.sleep(1.2)
    for _ in range(2 * processes):
        dispatch.send(("pipeline.detect", "detect"), None)
        time.sleep(0.3)
    time.sleep(1.0)


def done_photos() -> list[int]:
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.models import Image, ImageStatus

    with session_scope() as s:
        return list(s.scalars(select(Image.id).where(Image.status == ImageStatus.done.value)))


def finished_messages(ids: list[int], groups: dict[str, list[Process]], count: int) -> float:
    """The workers' CPU ms for one detect message whose photo is already finished (what each photo's own message
    costs when a batch already carried the photo through): ``count`` such messages, after the run, timed until
    the queue is empty; the workers' idle CPU over the same time is taken off."""
    import redis as redis_lib

    from shared import dispatch, queues
    from shared.config import get_settings

    client = redis_lib.Redis.from_url(get_settings().redis_url)

    def busy() -> bool:
        return bool(client.llen(queues.DETECT) or client.hlen("unacked"))

    time.sleep(1.0)
    idle0, t0 = cpu_snapshot(groups)["workers"], time.monotonic()
    time.sleep(2.0)
    idle_rate = (cpu_snapshot(groups)["workers"] - idle0) / (time.monotonic() - t0)
    cpu0, start = cpu_snapshot(groups)["workers"], time.monotonic()
    for k in range(count):
        dispatch.send(("pipeline.detect", queues.DETECT), ids[k % len(ids)])
    while busy():
        time.sleep(0.05)
    time.sleep(0.2)
    elapsed = time.monotonic() - start
    return 1000 * (cpu_snapshot(groups)["workers"] - cpu0 - idle_rate * elapsed) / count

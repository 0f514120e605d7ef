"""What `gestalt up` exposes to other users of the machine (issue #14): patient photos are PHI.

One real stack (`gestalt up --data-dir TMP`) with a photo stored through the S3 API. Then every TCP port
its process tree listens on is tried without credentials the way another local user could: plain HTTP
(the filer's listing and object paths, the master's and volume server's APIs, a read of the photo's own
volume file id, uploads and deletes), TLS without a client certificate, and plaintext gRPC (HTTP/2).
Only the S3 API (signed requests only) and the portal may answer; PostgreSQL and Redis demand their
passwords. And nothing under the data directory is readable by group or others.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

from shared.stack import PG_SYSTEM_USER, Ports, free_port
from shared.storage import Storage, original_key, sha256_hex

pytestmark = pytest.mark.e2e

BUCKET = "gestalt"  # the default of GESTALT_S3_BUCKET
# SeaweedFS's ports by offset from the base (shared.stack.EmbeddedEngines.seaweed_process).
SEAWEED_ROLES = {0: "master HTTP", 1: "master gRPC", 2: "volume HTTP", 3: "volume gRPC", 4: "filer HTTP",
                 5: "filer gRPC", 6: "S3 API", 7: "S3 gRPC", 8: "admin HTTP", 9: "admin gRPC"}
# SeaweedFS chmods each new volume's .vif to 0644 itself; `gestalt up` narrows it within NARROW_SECONDS (5 s).
NARROW_WAIT = 15.0
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


@dataclass
class Stack:
    up: subprocess.Popen
    data_dir: Path
    ports: Ports
    web_port: int
    key: str
    photo: bytes
    stale: Path
    fids: list[str] = field(default_factory=list)


def _photo() -> bytes:
    rng = np.random.default_rng(14)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _volume_fids(s3_dir: Path) -> list[str]:
    """File ids of the needles in the bucket's volumes, read from the volume files themselves.

    The strongest case for the volume server: an attacker who knows the photo's file id. An .idx entry is
    needle id (8 bytes), offset in 8-byte units (5 bytes in this "8000GB" build: 4 low bytes, then the high
    byte) and size (4); the needle in the .dat starts with its cookie (4) and id (8)."""
    fids = []
    for idx in sorted(s3_dir.glob(f"{BUCKET}_*.idx")):
        vid = int(idx.stem.rsplit("_", 1)[1])
        raw, dat = idx.read_bytes(), idx.with_suffix(".dat").read_bytes()
        entry = 17 if len(raw) % 17 == 0 else 16
        for at in range(0, len(raw) - entry + 1, entry):
            needle_id = struct.unpack(">Q", raw[at:at + 8])[0]
            offset = struct.unpack(">I", raw[at + 8:at + 12])[0] + (raw[at + 12] << 32 if entry == 17 else 0)
            start = offset * 8
            cookie, stored_id = struct.unpack(">IQ", dat[start:start + 12])
            if stored_id == needle_id:
                fids.append(f"{vid},{needle_id:x}{cookie:08x}")
    return fids[-8:]


def _wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        with contextlib.suppress(requests.RequestException):
            if requests.get(url + "/healthz", timeout=2).ok:
                return
        time.sleep(0.5)
    raise AssertionError("gestalt up did not serve: " + log.read_text()[-3000:])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("exposure")
    data_dir = tmp / "var"
    # A data directory as an older version left it: umask 022, world-readable.
    (data_dir / "logs").mkdir(parents=True)
    stale = data_dir / "logs" / "old-worker.log"
    stale.write_text("a traceback that named a patient\n")
    for path, mode in ((data_dir, 0o755), (data_dir / "logs", 0o755), (stale, 0o644)):
        path.chmod(mode)

    ports, web_port = Ports.free(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GESTALT_", "WEED_", "AWS_"))}
    env.update(GESTALT_WEB_PORT=str(web_port), GESTALT_EMBEDDED_PG_PORT=str(ports.postgres),
               GESTALT_EMBEDDED_REDIS_PORT=str(ports.redis), GESTALT_EMBEDDED_S3_PORT_BASE=str(ports.s3_base),
               GESTALT_WORKER_CONCURRENCY="1", PYTHONUNBUFFERED="1")
    log_path = tmp / "up.log"
    with open(log_path, "w") as log:
        up = subprocess.Popen([sys.executable, "-m", "shared.cli", "up", "--data-dir", str(data_dir)], env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_up(f"http://127.0.0.1:{web_port}", up, log_path)
        secrets = json.loads((data_dir / "secrets.json").read_text())
        storage = Storage(f"127.0.0.1:{ports.s3}", secrets["s3_access_key"], secrets["s3_secret_key"], BUCKET)
        photo = _photo()
        key = original_key(sha256_hex(photo), "jpg")
        storage.put(key, photo, "image/jpeg")
        assert storage.get(key) == photo
        yield Stack(up, data_dir, ports, web_port, key, photo, stale, _volume_fids(data_dir / "s3"))
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(60)
            except subprocess.TimeoutExpired:
                up.kill()
                up.wait(10)


def _tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def _listening(pid: int) -> dict[int, psutil.Process]:
    ports: dict[int, psutil.Process] = {}
    for proc in _tree(pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    ports.setdefault(conn.laddr.port, proc)
    return ports


def _short(text: str | bytes, n: int = 60) -> str:
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return " ".join(text.split())[:n]


def _http_probes(stack: Stack) -> list[tuple[str, str, dict]]:
    photo_dir = stack.key.rsplit("/", 1)[0]
    upload = {"files": {"file": ("planted.jpg", b"\xff\xd8\xff planted by another user", "image/jpeg")}}
    probes = [("GET", path, {}) for path in (
        "/", f"/buckets/{BUCKET}/originals/", f"/buckets/{BUCKET}/{photo_dir}/", f"/buckets/{BUCKET}/{stack.key}",
        "/dir/status", "/cluster/status", "/dir/assign", "/status", "/vol/status")]
    probes += [("GET", f"/{fid}", {}) for fid in stack.fids or ["1,0100000000"]]
    probes += [
        ("POST", "/submit", upload),  # the master's assign-and-upload
        ("POST", f"/buckets/{BUCKET}/originals/planted.jpg", upload),
        ("PUT", f"/buckets/{BUCKET}/originals/planted.jpg", {"data": b"\xff\xd8\xff planted"}),
        *[("POST", f"/{fid}", upload) for fid in stack.fids[:2]],
        ("DELETE", f"/buckets/{BUCKET}/{stack.key}", {}),
        ("DELETE", f"/buckets/{BUCKET}/originals/?recursive=true", {}),
        *[("DELETE", f"/{fid}", {}) for fid in stack.fids],
    ]
    return probes


def _try_http(port: int, stack: Stack) -> tuple[str, list[str]]:
    """Plain HTTP, no credentials: what answered, and which answers gave data, a listing or a write."""
    statuses: dict[str, int] = {}
    leaks = []
    sample = ""
    for method, path, kwargs in _http_probes(stack):
        try:
            r = requests.request(method, f"http://127.0.0.1:{port}{path}", timeout=3, allow_redirects=False,
                                 **kwargs)
        except requests.RequestException as exc:
            outcome = type(exc).__name__
        else:
            outcome = str(r.status_code)
            sample = sample or _short(r.content)
            if r.status_code < 400:  # a body, a listing, a redirect to the data, or a write or delete done
                leaks.append(f"{method} {path} -> {r.status_code} {_short(r.content, 80)!r}")
            if stack.photo[:64] in r.content:
                leaks.append(f"{method} {path} -> the photo's bytes")
        statuses[outcome] = statuses.get(outcome, 0) + 1
    summary = ", ".join(f"{k} x{v}" for k, v in sorted(statuses.items()))
    return f"HTTP: {summary}" + (f" ({sample!r})" if sample else ""), leaks


def _try_tls_without_cert(port: int) -> tuple[str, list[str]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(b"GET /dir/status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = tls.recv(256)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        return f"TLS w/o client cert: {reason}", []
    if not answer:
        return "TLS w/o client cert: closed", []
    return f"TLS w/o client cert: {_short(answer)!r}", [f"TLS without a client certificate -> {_short(answer)!r}"]


def _try_h2c(port: int) -> tuple[str, list[str]]:
    """Plaintext gRPC: an HTTP/2 server in the clear answers the preface with a SETTINGS frame."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=3) as s:
            s.sendall(H2_PREFACE)
            answer = s.recv(64)
    except OSError as exc:
        return f"plaintext gRPC: {type(exc).__name__}", []
    if len(answer) >= 9 and answer[3] == 0x04:
        return "plaintext gRPC: SETTINGS frame (served)", ["plaintext HTTP/2 (gRPC) answered with SETTINGS"]
    return f"plaintext gRPC: {'no answer' if not answer else repr(_short(answer, 30))}", []


def _try_postgres(port: int) -> tuple[str, list[str]]:
    import psycopg

    outcomes, leaks = [], []
    for password in (None, "postgres"):
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                                 password=password, connect_timeout=3):
                leaks.append(f"connected as postgres with password {password!r}")
        except psycopg.OperationalError as exc:
            outcomes.append(_short(str(exc).split(":")[-1].split(" for user")[0], 45))
    return "PostgreSQL: " + "; ".join(outcomes), leaks


def _try_redis(port: int) -> tuple[str, list[str]]:
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=3, socket_timeout=3, protocol=2)
    try:
        keys = client.keys("*")
    except redis.exceptions.AuthenticationError as exc:
        return f"Redis: {exc}", []
    except redis.exceptions.ResponseError as exc:
        return f"Redis: {exc}", [] if "auth" in str(exc).lower() else [f"Redis answered: {exc}"]
    finally:
        client.close()
    return f"Redis: {len(keys)} keys listed", [f"Redis listed {len(keys)} keys without a password"]


def _try_s3_unsigned(port: int, stack: Stack) -> tuple[str, list[str]]:
    leaks, statuses = [], []
    for path in (f"/{BUCKET}/{stack.key}", f"/{BUCKET}?list-type=2", "/"):
        r = requests.get(f"http://127.0.0.1:{port}{path}", timeout=3)
        statuses.append(str(r.status_code))
        if r.status_code < 400 or stack.photo[:64] in r.content or b"<Contents>" in r.content:
            leaks.append(f"unsigned GET {path} -> {r.status_code}")
    return f"S3 API, unsigned: {'/'.join(statuses)} (signed requests only)", leaks


def test_only_s3_and_the_portal_answer_without_credentials(stack):
    assert stack.fids, "no file id found in the bucket's volume files"
    listening = _listening(stack.up.pid)
    base = stack.ports.s3_base
    assert stack.ports.s3 in listening and stack.web_port in listening, listening
    rows, leaks = [], {}
    for port, proc in sorted(listening.items()):
        with contextlib.suppress(psutil.NoSuchProcess):
            name = proc.name()
        if port == stack.web_port:
            role = "portal"
            r = requests.get(f"http://127.0.0.1:{port}/", timeout=5, allow_redirects=False)
            results = [(f"portal: GET / -> {r.status_code} {r.headers.get('Location', '')}", [])]
        elif port == stack.ports.postgres:
            role, results = "PostgreSQL", [_try_postgres(port)]
        elif port == stack.ports.redis:
            role, results = "Redis", [_try_redis(port)]
        elif port == stack.ports.s3:
            role, results = "S3 API", [_try_s3_unsigned(port, stack)]
        else:
            role = SEAWEED_ROLES.get(port - base, "?") if "weed" in name else "?"
            results = [_try_http(port, stack), _try_tls_without_cert(port), _try_h2c(port)]
        rows.append((port, f"{name} ({role})", "; ".join(r[0] for r in results)))
        found = [leak for r in results for leak in r[1]]
        if found:
            leaks[f"{port} {name} ({role})"] = found

    # The probes changed nothing: the photo is intact and nothing was planted.
    secrets = json.loads((stack.data_dir / "secrets.json").read_text())
    storage = Storage(f"127.0.0.1:{stack.ports.s3}", secrets["s3_access_key"], secrets["s3_secret_key"], BUCKET)
    names = [o.object_name for o in storage.client.list_objects(BUCKET, prefix="originals/", recursive=True)]

    print(f"\nvolume file ids of the bucket's needles, tried on every HTTP port: {stack.fids}")
    width = max(len(r[1]) for r in rows)
    print(f"\n{'port':>6}  {'process (role)':<{width}}  what a request without credentials got")
    for port, who, what in rows:
        print(f"{port:>6}  {who:<{width}}  {what}")
    assert not leaks, json.dumps(leaks, indent=1)
    # SeaweedFS listens on its ten known ports and nothing else (no WebDAV, Iceberg, Lance, metrics, debug).
    assert not [row for row in rows if row[1].endswith("(?)")], rows
    assert names == [stack.key], names
    assert storage.get(stack.key) == stack.photo


def _loose(data_dir: Path) -> list[str]:
    """Entries under the data dir that group or others may read, write or enter."""
    found = []
    for root, dirs, files in os.walk(data_dir):
        for name in (*dirs, *files):
            path = Path(root, name)
            st = path.lstat()
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o077:
                found.append(f"{oct(stat.S_IMODE(st.st_mode))} {path.relative_to(data_dir)}")
    return found


def test_data_dir_is_its_owners_only(stack):
    deadline = time.monotonic() + NARROW_WAIT
    while (loose := _loose(stack.data_dir)) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not loose, loose

    st = stack.data_dir.stat()
    if os.geteuid() == 0:
        # PostgreSQL runs as its service account, which traverses (never lists) the data dir by group.
        import pwd

        assert stat.S_IMODE(st.st_mode) == 0o710, oct(st.st_mode)
        assert st.st_gid == pwd.getpwnam(PG_SYSTEM_USER).pw_gid
        assert (stack.data_dir / "pg").stat().st_uid == pwd.getpwnam(PG_SYSTEM_USER).pw_uid
    else:
        assert stat.S_IMODE(st.st_mode) == 0o700, oct(st.st_mode)
    for sub in ("logs", "s3", "redis", "seaweedfs-config"):
        assert stat.S_IMODE((stack.data_dir / sub).stat().st_mode) == 0o700, sub
    # A data dir of an older version is narrowed on start.
    assert stat.S_IMODE(stack.stale.stat().st_mode) == 0o600
    for name in ("secrets.json", "logs/seaweedfs.log", "logs/postgres.log", "logs/web.log",
                 "seaweedfs-config/security.toml", "seaweedfs-config/tls/client.key"):
        assert stat.S_IMODE((stack.data_dir / name).stat().st_mode) == 0o600, name
    assert list((stack.data_dir / "s3").glob("*.dat")), "no volume was written"

    # Unix sockets of the tree (SeaweedFS's gRPC ones live in /tmp): connectable by their owner only.
    sockets = set()
    for proc in _tree(stack.up.pid):
        with contextlib.suppress(psutil.NoSuchProcess):
            sockets |= {c.laddr for c in proc.net_connections(kind="unix") if c.laddr and os.path.exists(c.laddr)}
    assert sockets
    loose_sockets = [f"{oct(stat.S_IMODE(os.stat(s).st_mode))} {s}" for s in sockets if os.stat(s).st_mode & 0o077]
    assert not loose_sockets, loose_sockets

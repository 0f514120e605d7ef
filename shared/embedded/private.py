"""Nothing the embedded stack writes is readable by other local users (patient photos are PHI).

Every child process runs with :data:`PRIVATE_UMASK`, files are written 0600, an older data directory
is narrowed to owner-only, and the engines' passwords are generated once into ``<data_dir>/secrets.json``.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

SECRET_NAMES = ("pg_password", "redis_password", "s3_access_key", "s3_secret_key", "secret_key",
                # SeaweedFS's own JWT keys: master->volume writes and reads, S3 gateway->filer writes and reads
                "seaweed_jwt_write", "seaweed_jwt_read", "seaweed_filer_jwt_write", "seaweed_filer_jwt_read",
                "seaweed_admin_password")
# Every process the stack starts creates files for its owner only (0600 files, 0700 directories).
PRIVATE_UMASK = 0o077


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` (created 0600), making its parent directories as needed."""
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
    """The stack's passwords and keys from ``<data_dir>/secrets.json``; missing ones are generated and saved."""
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
        write_private(path, json.dumps(values, indent=2))
    return values


def as_user(user: str | None) -> dict:
    """Popen arguments that run a child as ``user`` with that account's groups only.

    ``user=`` alone changes the uid and keeps root's gid and supplementary groups; the group is what
    lets PostgreSQL's service account traverse the 0710 data directory."""
    if not user:
        return {}
    import pwd

    gid = pwd.getpwnam(user).pw_gid
    return {"user": user, "group": gid, "extra_groups": [gid]}

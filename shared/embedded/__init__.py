"""The embedded engines of ``gestalt up`` and the tests: PostgreSQL, Redis and SeaweedFS from pip wheels.

One module per concern:

* :mod:`.private` - files, secrets and child processes for the owner only (umask, 0600 files, the
  PostgreSQL service account's Popen arguments);
* :mod:`.process` - a supervised child process, loopback ports, waiting until an engine answers;
* :mod:`.postgres`, :mod:`.redis_server`, :mod:`.seaweedfs` - each engine's command line, data and readiness;
* :mod:`.seaweed_tls` - SeaweedFS's per-start CA, component certificates and ``security.toml``;
* :mod:`.engines` - :class:`EmbeddedEngines`, the three together under one data directory.

:mod:`shared.stack` runs them with the app's processes under a supervisor and re-exports these names.
"""
from __future__ import annotations

from shared.embedded.engines import EmbeddedEngines
from shared.embedded.postgres import DATABASE_NAME, PG_SYSTEM_USER
from shared.embedded.private import (
    PRIVATE_UMASK,
    SECRET_NAMES,
    load_or_create_secrets,
    restrict_tree,
    write_private,
)
from shared.embedded.process import LOCALHOST, Ports, Process, StackError, free_port
from shared.embedded.seaweed_tls import SEAWEED_TLS_COMPONENTS, seaweed_security_toml, write_seaweed_tls

__all__ = [
    "DATABASE_NAME", "LOCALHOST", "PG_SYSTEM_USER", "PRIVATE_UMASK", "SEAWEED_TLS_COMPONENTS", "SECRET_NAMES",
    "EmbeddedEngines", "Ports", "Process", "StackError", "free_port", "load_or_create_secrets", "restrict_tree",
    "seaweed_security_toml", "write_private", "write_seaweed_tls",
]

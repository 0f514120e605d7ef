"""What the portal and the CLI both call: cases, diagnoses (users, exports: ``shared.users``,
``shared.phenopackets``). A service takes a session and plain values, writes and audits, and raises
:class:`Refusal` for input a person can correct; it knows nothing of HTTP or the command line."""
from __future__ import annotations


class Refusal(Exception):
    """A request refused for a reason the person can act on: ``message`` for them, ``status`` for HTTP."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.message = message
        self.status = status

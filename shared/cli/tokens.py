"""``gestalt tokens``: per-user API tokens."""
from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from shared.cli.common import console


@click.group()
def tokens() -> None:
    """Per-user API tokens (Authorization: Bearer ...)."""


@tokens.command("create")
@click.option("--email", required=True)
@click.option("--name", default="api", show_default=True)
@click.option("--days", type=click.IntRange(1, 3650), default=None,
              help="Days until the token expires (default: GESTALT_TOKEN_DAYS, 90).")
def tokens_create(email: str, name: str, days: int | None) -> None:
    """Create a token; its secret is printed once."""
    from shared.audit import audit
    from shared.db import session_scope
    from shared.users import create_token, find_user

    with session_scope() as session:
        user = find_user(session, email)
        if user is None:
            raise click.ClickException(f"no user {email}")
        token, secret = create_token(session, user, name, days)
        audit(session, "token_create", None, "api_token", token.id, via="cli", owner=user.id)
        console.print(f"token {token.id} for {user.email}, valid until {token.expires_at:%Y-%m-%d %H:%M} UTC; "
                      "store it now, it is not shown again:")
    click.echo(secret)


@tokens.command("list")
def tokens_list() -> None:
    """Every token: id, owner, name, created, last used, expiry and state (never the secret)."""
    from datetime import UTC, datetime

    from shared.db import session_scope
    from shared.users import list_tokens

    def when(value) -> str:
        return f"{value:%Y-%m-%d %H:%M}" if value else "-"

    # A token is told apart by its id (what `gestalt tokens revoke` takes) and name; no part of its secret is shown.
    table = Table("id", "owner", "name", "created", "last used", "expires", "state")
    now = datetime.now(UTC)
    with session_scope() as session:
        for token, email in list_tokens(session):
            state = "revoked" if token.revoked_at else (
                "expired" if token.expires_at and token.expires_at <= now else "active")
            table.add_row(str(token.id), email, token.name, when(token.created_at),
                          when(token.last_used_at), when(token.expires_at) if token.expires_at else "never", state)
    Console(width=160).print(table)


@tokens.command("revoke")
@click.argument("token_id", type=int)
def tokens_revoke(token_id: int) -> None:
    from shared.audit import audit
    from shared.db import session_scope
    from shared.users import UserError, revoke_token

    try:
        with session_scope() as session:
            revoke_token(session, token_id)
            audit(session, "token_revoke", None, "api_token", token_id, via="cli")
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc
    console.print(f"token {token_id} revoked")

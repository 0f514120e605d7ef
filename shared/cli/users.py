"""``gestalt users``: accounts."""
from __future__ import annotations

import click

from shared.cli.common import console


@click.group()
def users() -> None:
    """Manage accounts."""


@users.command("create")
@click.option("--email", prompt=True)
@click.option("--password", prompt=True, hide_input=True, confirmation_prompt=True)
@click.option("--admin", is_flag=True, help="Give the account the admin role.")
def users_create(email: str, password: str, admin: bool) -> None:
    """Create an account (clinician unless --admin)."""
    from shared.audit import audit
    from shared.db import session_scope
    from shared.models import Role
    from shared.users import UserError, create_user

    try:
        with session_scope() as session:
            user = create_user(session, email, password, Role.admin if admin else Role.clinician)
            audit(session, "user_create", None, "user", user.id, via="cli", role=user.role)
            console.print(f"created {user.role} {user.email} (id {user.id})")
    except UserError as exc:
        raise click.ClickException(str(exc)) from exc

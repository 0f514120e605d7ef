"""Accounts: creation and password checks (Argon2id)."""
from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.models import ApiToken, Role, User

_hasher = PasswordHasher()
MIN_PASSWORD_LENGTH = 10


class UserError(ValueError):
    pass


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"passwords need at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(user: User, password: str) -> bool:
    try:
        return _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def find_user(session: Session, email: str) -> User | None:
    if "\x00" in email:
        return None  # PostgreSQL text cannot hold it, so no account can match
    return session.scalars(select(User).where(func.lower(User.email) == email.strip().lower())).first()


def create_user(session: Session, email: str, password: str, role: Role = Role.clinician) -> User:
    email = email.strip().lower()
    if "@" not in email or "\x00" in email or len(email) > 254:
        raise UserError(f"{email!r} is not an e-mail address")
    if find_user(session, email):
        raise UserError(f"a user {email} already exists")
    user = User(email=email, password_hash=hash_password(password), role=role.value, is_active=True)
    session.add(user)
    session.flush()
    return user


BEARER_PREFIX = "gst_"  # marks Gestalt API tokens


def create_token(session: Session, user: User, name: str) -> tuple[ApiToken, str]:
    """A new API token; the secret is returned once and only its hash is stored."""
    secret = BEARER_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(user_id=user.id, name=name[:64], token_sha256=hashlib.sha256(secret.encode()).hexdigest(),
                     prefix=secret[:12])
    session.add(token)
    session.flush()
    return token, secret


def user_for_token(session: Session, secret: str) -> User | None:
    """The active user of a valid, unrevoked token (and note its use)."""
    if not secret.startswith(BEARER_PREFIX):
        return None
    token = session.scalars(select(ApiToken).where(
        ApiToken.token_sha256 == hashlib.sha256(secret.encode()).hexdigest(), ApiToken.revoked_at.is_(None))).first()
    if token is None:
        return None
    user = session.get(User, token.user_id)
    if user is None or not user.is_active:
        return None
    token.last_used_at = datetime.now(UTC)
    return user


def revoke_token(session: Session, token_id: int) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise UserError(f"no API token {token_id}")
    token.revoked_at = token.revoked_at or datetime.now(UTC)
    return token

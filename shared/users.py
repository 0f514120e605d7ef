"""Accounts: creation, password checks (Argon2id), login sessions and API tokens.

A credential change (password reset or change, disabling the account) ends every login session
and revokes every API token of the user: whoever held the old password holds nothing after it.
"""
from __future__ import annotations

import contextlib
import hashlib
import secrets
import unicodedata
from datetime import UTC, datetime, timedelta
from functools import cache

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from email_validator import EmailNotValidError, validate_email
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from shared.models import ApiToken, LoginSession, Role, User

_hasher = PasswordHasher()
MIN_PASSWORD_LENGTH = 10


class UserError(ValueError):
    pass


class WrongPassword(UserError):
    """The current password given for a change is not the account's."""


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise UserError(f"passwords need at least {MIN_PASSWORD_LENGTH} characters")
    return _hasher.hash(password)


def verify_password(user: User, password: str) -> bool:
    try:
        return _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


@cache
def _dummy_hash() -> str:
    """An Argon2 hash of no one's password, made once per process."""
    return _hasher.hash(secrets.token_urlsafe(24))


def check_login(session: Session, email: str, password: str) -> tuple[User | None, bool]:
    """The account of ``email`` (None when there is none) and whether ``password`` logs it in (an active account
    and its password). A missing or disabled account is checked against a dummy hash with the same Argon2 work,
    so how long the answer takes does not tell who has an account."""
    user = find_user(session, email)
    if user is None or not user.is_active:
        with contextlib.suppress(VerificationError, InvalidHashError):
            _hasher.verify(_dummy_hash(), password)
        return user, False
    return user, verify_password(user, password)


def login_key(email: str) -> str:
    """An e-mail address as accounts are looked up: NFKC (full-width and other compatibility forms become plain
    letters), without surrounding spaces, lower case."""
    return unicodedata.normalize("NFKC", email).strip().lower()


def find_user(session: Session, email: str) -> User | None:
    if "\x00" in email:
        return None  # PostgreSQL text cannot hold it, so no account can match
    return session.scalars(select(User).where(func.lower(User.email) == login_key(email))).first()


def normalise_email(email: str) -> str:
    """The address in canonical form (NFKC: a full-width or other compatibility letter becomes the plain one; lower
    case), or UserError naming what is wrong (no markup, no spaces, a real domain, one script per part)."""
    try:
        address = validate_email(login_key(email), check_deliverability=False).normalized.lower()
    except EmailNotValidError as exc:
        raise UserError(f"{email[:100]!r} is not an e-mail address: {exc}") from None
    from confusable_homoglyphs import confusables

    local, _, domain = address.rpartition("@")
    for part in (local, *domain.split(".")):
        if confusables.is_mixed_script(part):
            raise UserError(f"{address!r} mixes alphabets in {part!r} (e.g. a Cyrillic letter among Latin ones), "
                            "as a look-alike of another address would; use one alphabet per part")
    return address


def look_alike(address: str) -> str:
    """The address as it looks: every letter that has a Latin look-alike (Cyrillic а, Greek ο, ...) replaced by it
    (Unicode's confusables data), so two addresses that read the same compare equal."""
    from confusable_homoglyphs import confusables

    found = confusables.is_confusable(address, preferred_aliases=["latin"], greedy=True) or []
    latin = {f["character"]: f["homoglyphs"][0]["c"] for f in found if f["homoglyphs"]}
    return "".join(latin.get(ch, ch) for ch in address).lower()


def create_user(session: Session, email: str, password: str, role: Role = Role.clinician,
                must_change_password: bool = False) -> User:
    email = normalise_email(email)
    if len(email) > 254:
        raise UserError("an e-mail address has at most 254 characters")
    if find_user(session, email):
        raise UserError(f"a user {email} already exists")
    seen = look_alike(email)
    twin = next((e for e in session.scalars(select(User.email)) if look_alike(e) == seen), None)
    if twin is not None:
        raise UserError(f"{email!r} looks like the existing account {twin!r} (letters from another alphabet that "
                        "read the same); choose an address that does not")
    user = User(email=email, password_hash=hash_password(password), role=role.value, is_active=True,
                must_change_password=must_change_password)
    session.add(user)
    session.flush()
    return user


BEARER_PREFIX = "gst_"  # marks Gestalt API tokens


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_token(session: Session, user: User, name: str, days: int | None = None) -> tuple[ApiToken, str]:
    """A new API token valid for ``days`` (default: the token_days setting); the secret is returned once
    and only its hash is stored."""
    from shared.config import get_settings

    days = get_settings().token_days if days is None else days
    if days < 1:
        raise UserError("a token is valid for at least one day")
    secret = BEARER_PREFIX + secrets.token_urlsafe(32)
    # No part of the secret is stored: the prefix column keeps only the scheme's marker (a listing shows the id).
    token = ApiToken(user_id=user.id, name=name[:64], token_sha256=_sha256(secret), prefix=BEARER_PREFIX,
                     expires_at=datetime.now(UTC) + timedelta(days=days))
    session.add(token)
    session.flush()
    return token, secret


def user_for_token(session: Session, secret: str) -> User | None:
    """The active user of a valid, unrevoked token (and note its use)."""
    if not secret.startswith(BEARER_PREFIX):
        return None
    now = datetime.now(UTC)
    token = session.scalars(select(ApiToken).where(
        ApiToken.token_sha256 == _sha256(secret), ApiToken.revoked_at.is_(None))).first()
    if token is None or (token.expires_at is not None and token.expires_at <= now):
        return None
    user = session.get(User, token.user_id)
    if user is None or not user.is_active:
        return None
    token.last_used_at = now
    return user


def list_tokens(session: Session) -> list[tuple[ApiToken, str]]:
    """Every token with its owner's e-mail, newest first (never a secret: only hashes are stored)."""
    return list(session.execute(select(ApiToken, User.email).join(User, User.id == ApiToken.user_id)
                                .order_by(ApiToken.id.desc())).tuples())


def revoke_token(session: Session, token_id: int) -> ApiToken:
    token = session.get(ApiToken, token_id)
    if token is None:
        raise UserError(f"no API token {token_id}")
    token.revoked_at = token.revoked_at or datetime.now(UTC)
    return token


# ----------------------------------------------------------------------------------- login sessions
def start_session(session: Session, user: User, ip: str | None) -> str:
    """A new login session; returns the secret the cookie carries (only its hash is stored)."""
    secret = secrets.token_urlsafe(32)
    now = datetime.now(UTC)
    session.add(LoginSession(user_id=user.id, token_sha256=_sha256(secret), ip=(ip or "")[:64] or None,
                             created_at=now, last_seen_at=now))
    user.last_login_at = now
    session.flush()
    return secret


def session_user(session: Session, user_id: int, secret: str, idle: timedelta, lifetime: timedelta) -> User | None:
    """The active user of a live login session; ends the session when it was idle or open too long."""
    # The login and its user in one round trip: this runs on every request.
    row = session.execute(select(LoginSession, User).join(User, User.id == LoginSession.user_id).where(
        LoginSession.token_sha256 == _sha256(secret), LoginSession.user_id == user_id,
        LoginSession.ended_at.is_(None))).first()
    if row is None:
        return None
    login, user = row
    now = datetime.now(UTC)
    if now - login.last_seen_at > idle or now - login.created_at > lifetime:
        login.ended_at, login.end_reason = now, "expired"
        return None
    if not user.is_active:
        return None
    if now - login.last_seen_at > timedelta(seconds=60):  # one write a minute, not one per request
        login.last_seen_at = now
    return user


def end_session(session: Session, secret: str, reason: str = "logout") -> None:
    session.execute(update(LoginSession).where(LoginSession.token_sha256 == _sha256(secret),
                                               LoginSession.ended_at.is_(None))
                    .values(ended_at=datetime.now(UTC), end_reason=reason))


def revoke_credentials(session: Session, user: User, reason: str) -> tuple[int, int]:
    """End every login session and revoke every API token of ``user``; returns (sessions, tokens) ended."""
    now = datetime.now(UTC)
    ended = session.execute(update(LoginSession).where(LoginSession.user_id == user.id,
                                                       LoginSession.ended_at.is_(None))
                            .values(ended_at=now, end_reason=reason[:32])).rowcount
    revoked = session.execute(update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
                              .values(revoked_at=now)).rowcount
    return ended, revoked


def reset_password(session: Session, user: User) -> str:
    """A temporary password (returned once) that must be changed at the next login; old credentials end."""
    temporary = secrets.token_urlsafe(12)
    user.password_hash = hash_password(temporary)
    user.must_change_password = True
    revoke_credentials(session, user, "password_reset")
    return temporary


def disable_user(session: Session, user: User) -> None:
    user.is_active = False
    revoke_credentials(session, user, "disabled")


def change_password(session: Session, user: User, current: str, new: str) -> None:
    """The user's own change: the current password is required, the new one must differ; old credentials end."""
    if not verify_password(user, current):
        raise WrongPassword("the current password is wrong")
    if new == current:
        raise UserError("the new password must differ from the current one")
    user.password_hash = hash_password(new)
    user.must_change_password = False
    revoke_credentials(session, user, "password_change")

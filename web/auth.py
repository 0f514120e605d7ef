"""Login, logout, password changes and the rule that every page and API needs a logged-in user.

A portal login is a server-side session (``login_sessions``): the signed cookie carries its secret,
so logging out, an idle or absolute timeout, a password reset or change and disabling the account
end it on the server, and a replayed cookie is worth nothing afterwards.
"""
from __future__ import annotations

import hashlib
from datetime import timedelta
from functools import wraps
from urllib.parse import urlsplit

from flask import Blueprint, Flask, abort, flash, g, jsonify, redirect, render_template, request, session, url_for
from flask_limiter.util import get_remote_address
from flask_login import LoginManager, current_user, login_user, logout_user
from flask_wtf import FlaskForm
from flask_wtf.csrf import CSRFProtect
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired, EqualTo, Length

from shared.audit import audit
from shared.config import get_settings
from shared.models import User
from shared.users import (
    MIN_PASSWORD_LENGTH,
    UserError,
    WrongPassword,
    change_password,
    check_login,
    end_session,
    login_key,
    session_user,
    start_session,
    user_for_token,
)
from web.db import get_db
from web.limits import limiter, user_key

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
csrf = CSRFProtect()  # every form and every cookie-authenticated API write (a token's requests are exempt)


def _account_key() -> str:
    """Failed logins count per account, from whatever address: an attacker of one account locks out that account
    for a minute, never the others (the per-address limit is looser)..."""
    return f"account:{login_key(request.form.get('email') or '')[:254]}"


def _login_failed(response) -> bool:
    """...and only failures count: a clinic's staff logging in all morning is no attack."""
    return response.status_code != 302


def _wrong_password(_response) -> bool:
    return bool(g.get("wrong_password"))


PUBLIC_ENDPOINTS = {"auth.login", "static", "healthz"}
# What a user who must choose a new password may still reach.
PASSWORD_CHANGE_ENDPOINTS = {"auth.change_password_view", "auth.logout", "static", "healthz"}


class LoginUser:
    """The Flask-Login view of a user row (detached from the request session)."""

    def __init__(self, user: User, session_secret: str | None = None, token_secret: str | None = None):
        self.id = user.id
        self.email = user.email
        self.role = user.role
        self.active = user.is_active
        self.must_change_password = user.must_change_password
        self.session_secret = session_secret
        # Names this login (a portal session or an API token) without its secret: reads audited once per login.
        secret = session_secret or token_secret or ""
        self.login_key = ("session:" if session_secret else "token:") + hashlib.sha256(secret.encode()).hexdigest()[:32]

    is_authenticated = True
    is_anonymous = False

    @property
    def is_active(self) -> bool:
        return self.active

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def get_id(self) -> str:
        # Flask-Login keeps this in the cookie: the user and the secret of the server-side session.
        return f"{self.id}:{self.session_secret}"


class LoginForm(FlaskForm):
    email = EmailField("E-mail", validators=[DataRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])


class PasswordForm(FlaskForm):
    current = PasswordField("Current password", validators=[DataRequired(), Length(max=1024)])
    new = PasswordField(f"New password (at least {MIN_PASSWORD_LENGTH} characters)",
                        validators=[DataRequired(), Length(min=MIN_PASSWORD_LENGTH, max=1024)])
    repeat = PasswordField("New password again", validators=[DataRequired(), EqualTo("new", "the passwords differ")])


@login_manager.user_loader
def load_user(cookie_id: str) -> LoginUser | None:
    user_id, _, secret = cookie_id.partition(":")
    if not (user_id.isascii() and user_id.isdigit() and len(user_id) < 10 and secret):
        return None
    settings = get_settings()
    db = get_db()
    user = session_user(db, int(user_id), secret, timedelta(hours=settings.session_idle_hours),
                        timedelta(hours=settings.session_max_hours))
    if db.dirty:
        db.commit()  # the last-seen time, or the end of an expired session
    return LoginUser(user, secret) if user is not None else None


def authenticate_bearer() -> None:
    """API clients: ``Authorization: Bearer gst_...`` (a revocable, expiring per-user token; the scheme's case does not
    matter, RFC 6750). A request that carries one is that token's user, or nobody when the token is not valid,
    whatever cookies it also carries: a client's cookie jar (a stale portal session) neither refuses a valid token
    nor stands in for an invalid one. Runs before anything reads ``current_user`` (the rate limits key on it)."""
    scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return
    db = get_db()
    user = user_for_token(db, credentials.strip()) if credentials.strip() else None
    if user is not None:
        db.commit()
        g.token_auth = True
    # Flask-Login's per-request user: set here, it never looks at the session cookie for this request.
    g._login_user = LoginUser(user, token_secret=credentials.strip()) if user is not None \
        else login_manager.anonymous_user()


@login_manager.unauthorized_handler
def unauthorized():
    if request.path.startswith("/api/"):
        return jsonify(error="login required"), 401
    return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    login_manager.session_protection = "strong"
    app.before_request(authenticate_bearer)  # before the rate limits' check, which keys on the user
    limiter.init_app(app)
    # CSRF is checked below for cookie sessions; bearer-token API calls carry no cookie to forge.
    app.config["WTF_CSRF_CHECK_DEFAULT"] = False

    @app.before_request
    def require_login():
        unsafe = request.method not in ("GET", "HEAD", "OPTIONS")
        if request.endpoint is None:  # no such route or method: the 404/405 answers, nothing is served
            return None
        if request.endpoint in PUBLIC_ENDPOINTS:
            if unsafe:
                csrf.protect()
            return None
        if not current_user.is_authenticated:
            return login_manager.unauthorized()
        if unsafe and not g.get("token_auth"):
            csrf.protect()
        if current_user.must_change_password and request.endpoint not in PASSWORD_CHANGE_ENDPOINTS:
            if request.path.startswith("/api/"):
                return jsonify(error="choose a new password in the portal first (/account/password)"), 403
            return redirect(url_for("auth.change_password_view"))
        return None


def admin_required(view):
    @wraps(view)
    def wrapper(*args, **kwargs):
        if not current_user.is_admin:
            abort(403)
        return view(*args, **kwargs)
    return wrapper


def _safe_next(target: str | None) -> str:
    if target and not urlsplit(target).netloc and target.startswith("/") and not target.startswith("//"):
        return target
    return url_for("cases.index")


@bp.route("/login", methods=["GET", "POST"])
@limiter.limit(lambda: get_settings().login_rate_limit, key_func=_account_key, methods=["POST"],
               deduct_when=_login_failed, scope="login-account",
               error_message="too many failed logins for this account; wait a minute and try again")
@limiter.limit(lambda: get_settings().login_address_rate_limit, key_func=get_remote_address, methods=["POST"],
               deduct_when=_login_failed, scope="login-address",
               error_message="too many failed logins from this address; wait and try again")
def login():
    form = LoginForm()
    if form.validate_on_submit():
        db = get_db()
        user, verified = check_login(db, form.email.data, form.password.data)
        if verified:
            secret = start_session(db, user, request.remote_addr)
            audit(db, "login", user.id, "user", user.id, ip=request.remote_addr)
            db.commit()
            session.clear()  # a fresh cookie: nothing from before the login carries over
            login_user(LoginUser(user, secret))
            if user.must_change_password:
                flash("Choose your own password before you go on.", "info")
                return redirect(url_for("auth.change_password_view"))
            return redirect(_safe_next(request.args.get("next")))
        audit(db, "login_failed", user.id if user else None, ip=request.remote_addr)
        db.commit()
        flash("Wrong e-mail or password.", "error")
    return render_template("login.html", form=form), 200 if request.method == "GET" else 401


@bp.post("/logout")
def logout():
    db = get_db()
    if current_user.session_secret:
        end_session(db, current_user.session_secret)
    audit(db, "logout", current_user.id, "user", current_user.id, ip=request.remote_addr)
    db.commit()
    logout_user()
    session.clear()
    return redirect(url_for("auth.login"))


@bp.route("/account/password", methods=["GET", "POST"])
@limiter.limit(lambda: get_settings().login_rate_limit, key_func=user_key, methods=["POST"],
               deduct_when=_wrong_password, scope="password-change",
               error_message="too many wrong current passwords; wait a minute and try again")
def change_password_view():
    """Change one's own password; every other session and API token of the account ends with it. A wrong current
    password is a guess at it: limited per account and audited as a failed login is."""
    form = PasswordForm()
    if form.validate_on_submit():
        db = get_db()
        user = db.get(User, current_user.id)
        try:
            change_password(db, user, form.current.data, form.new.data)
        except UserError as exc:
            db.rollback()
            if isinstance(exc, WrongPassword):
                g.wrong_password = True
                audit(db, "password_change_failed", user.id, "user", user.id, ip=request.remote_addr)
                db.commit()
            form.current.errors = [*form.current.errors, str(exc)]
        else:
            secret = start_session(db, user, request.remote_addr)  # this browser stays logged in
            audit(db, "password_change", user.id, "user", user.id, ip=request.remote_addr)
            db.commit()
            login_user(LoginUser(user, secret))
            flash("Your password was changed; other sessions and API tokens of your account have ended.", "info")
            return redirect(url_for("cases.index"))
    return render_template("password.html", form=form, forced=current_user.must_change_password), \
        200 if request.method == "GET" else 400

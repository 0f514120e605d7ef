"""Login, logout and the rule that every page and API needs a logged-in user."""
from __future__ import annotations

from datetime import UTC, datetime
from functools import wraps
from urllib.parse import urlsplit

from flask import Blueprint, Flask, abort, flash, g, jsonify, redirect, render_template, request, url_for
from flask_limiter import Limiter
from flask_limiter.util import get_remote_address
from flask_login import LoginManager, current_user, login_user, logout_user
from flask_wtf import FlaskForm
from wtforms import EmailField, PasswordField
from wtforms.validators import DataRequired, Length

from shared.audit import audit
from shared.config import get_settings
from shared.models import User
from shared.users import find_user, user_for_token, verify_password
from web import csrf
from web.db import get_db

bp = Blueprint("auth", __name__)
login_manager = LoginManager()
# Counts live in Redis, so every gunicorn worker shares them.
limiter = Limiter(key_func=get_remote_address, default_limits=[])


def _login_key() -> str:
    """Attempts count per client address and account, so one clinic's NAT does not lock everyone out."""
    return f"{get_remote_address()}:{(request.form.get('email') or '').strip().lower()[:254]}"
PUBLIC_ENDPOINTS = {"auth.login", "static", "healthz"}


class LoginUser:
    """The Flask-Login view of a user row (detached from the request session)."""

    def __init__(self, user: User):
        self.id = user.id
        self.email = user.email
        self.role = user.role
        self.active = user.is_active

    is_authenticated = True
    is_anonymous = False

    @property
    def is_active(self) -> bool:
        return self.active

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def get_id(self) -> str:
        return str(self.id)


class LoginForm(FlaskForm):
    email = EmailField("E-mail", validators=[DataRequired(), Length(max=254)])
    password = PasswordField("Password", validators=[DataRequired(), Length(max=1024)])


@login_manager.user_loader
def load_user(user_id: str) -> LoginUser | None:
    if not (user_id.isascii() and user_id.isdigit()):
        return None
    user = get_db().get(User, int(user_id))
    return LoginUser(user) if user is not None and user.is_active else None


@login_manager.request_loader
def load_user_from_token(req) -> LoginUser | None:
    """API clients: ``Authorization: Bearer gst_...`` (a revocable per-user token)."""
    header = req.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    db = get_db()
    user = user_for_token(db, header[len("Bearer "):].strip())
    if user is None:
        return None
    db.commit()
    g.token_auth = True
    return LoginUser(user)


@login_manager.unauthorized_handler
def unauthorized():
    if request.path.startswith("/api/"):
        return jsonify(error="login required"), 401
    return redirect(url_for("auth.login", next=request.full_path if request.query_string else request.path))


def init_app(app: Flask) -> None:
    login_manager.init_app(app)
    login_manager.session_protection = "strong"
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
@limiter.limit(lambda: get_settings().login_rate_limit, key_func=_login_key, methods=["POST"],
               error_message="too many login attempts; wait a minute and try again")
def login():
    form = LoginForm()
    if form.validate_on_submit():
        db = get_db()
        user = find_user(db, form.email.data)
        if user is not None and user.is_active and verify_password(user, form.password.data):
            user.last_login_at = datetime.now(UTC)
            audit(db, "login", user.id, "user", user.id, ip=request.remote_addr)
            db.commit()
            login_user(LoginUser(user))
            return redirect(_safe_next(request.args.get("next")))
        audit(db, "login_failed", user.id if user else None, ip=request.remote_addr)
        db.commit()
        flash("Wrong e-mail or password.", "error")
    return render_template("login.html", form=form), 200 if request.method == "GET" else 401


@bp.post("/logout")
def logout():
    audit(get_db(), "logout", current_user.id, "user", current_user.id, ip=request.remote_addr)
    get_db().commit()
    logout_user()
    return redirect(url_for("auth.login"))

"""The portal: Flask app factory, with one ``init_app`` per subsystem."""
from __future__ import annotations

import logging

from flask import Flask, Request, g, jsonify
from flask_login import current_user
from werkzeug.routing import IntegerConverter

from shared.config import ConfigError, get_settings

logger = logging.getLogger(__name__)


# Where an admin uploads a photo archive (web/imports.py): a body up to GESTALT_IMPORT_MAX_ARCHIVE_MB.
ARCHIVE_ENDPOINTS = frozenset({"api.import_photos", "admin.import_photos"})


class PortalRequest(Request):
    """Flask's request, whose body limit is ``MAX_CONTENT_LENGTH`` (one photo and the form) except an admin's archive
    import. The limit is read when the body is first parsed (the login's CSRF check), after the login is known, so
    anyone else's body to the same address is held to the ordinary limit."""

    @property
    def max_content_length(self) -> int | None:
        if self._max_content_length is None and self.endpoint in ARCHIVE_ENDPOINTS and \
                current_user.is_authenticated and current_user.is_admin:
            return get_settings().import_max_archive_bytes + 1024 * 1024
        return Request.max_content_length.fget(self)

    @max_content_length.setter
    def max_content_length(self, value: int | None) -> None:
        Request.max_content_length.fset(self, value)


class DatabaseId(IntegerConverter):
    def __init__(self, url_map, *args, **kwargs):
        kwargs.setdefault("max", 2**31 - 1)
        super().__init__(url_map, *args, **kwargs)


def trust_proxies(app: Flask, hops: int) -> None:
    """Behind ``hops`` reverse proxies, the client's address and scheme are those the proxies saw (rate limits, the
    audit log, secure cookies); X-Forwarded-For entries beyond that many hops are the client's own claims, ignored."""
    if hops < 0:
        raise ConfigError(f"GESTALT_TRUSTED_PROXIES must be 0 or more, got {hops}")
    if hops:
        from werkzeug.middleware.proxy_fix import ProxyFix

        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=hops, x_proto=hops)


def security_headers(response):
    """Every answer: no sniffing, no framing, no referrer to other sites, no caching, only this origin's scripts."""
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
        "script-src 'self'; frame-ancestors 'none'")
    return response


def create_app(test_config: dict | None = None) -> Flask:
    settings = get_settings()
    app = Flask(__name__)
    app.request_class = PortalRequest
    # Row ids are PostgreSQL integers: a larger number in a URL is a 404, never a database error.
    app.url_map.converters["int"] = DatabaseId
    if not settings.secret_key and not (test_config or {}).get("SECRET_KEY"):
        raise ConfigError("GESTALT_SECRET_KEY is not set (gestalt up generates one for the embedded stack)")
    app.config.update(
        SECRET_KEY=settings.secret_key,
        # Whole request body: one photo plus form fields.
        MAX_CONTENT_LENGTH=settings.max_upload_bytes + 1024 * 1024,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=settings.secure_cookies,
        REMEMBER_COOKIE_HTTPONLY=True,
        REMEMBER_COOKIE_SECURE=settings.secure_cookies,
        WTF_CSRF_TIME_LIMIT=None,
    )
    if test_config:
        app.config.update(test_config)
    trust_proxies(app, settings.trusted_proxies)
    app.config.setdefault("RATELIMIT_STORAGE_URI", settings.redis_url or "memory://")
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    # If Redis is briefly down, logins still work (unlimited) rather than failing.
    app.config.setdefault("RATELIMIT_SWALLOW_ERRORS", True)

    from web.auth import csrf
    from web.charts import duration

    csrf.init_app(app)

    app.jinja_env.filters["duration"] = duration
    from web import admin, api, auth, cases, db, errors, heatmaps, inputs

    db.init_app(app)
    auth.init_app(app)
    inputs.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(cases.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(heatmaps.bp)
    errors.init_app(app, settings.max_upload_mb)

    app.after_request(security_headers)

    @app.get("/healthz")
    def healthz():
        g.skip_login = True
        return jsonify(status="ok")

    return app


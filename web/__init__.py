"""The portal: Flask app factory, with one ``init_app`` per subsystem."""
from __future__ import annotations

import logging

from flask import Flask, g, jsonify, render_template, request
from flask_wtf.csrf import CSRFError, CSRFProtect
from werkzeug.routing import IntegerConverter

from shared.config import ConfigError, get_settings

logger = logging.getLogger(__name__)
csrf = CSRFProtect()


class DatabaseId(IntegerConverter):
    def __init__(self, url_map, *args, **kwargs):
        kwargs.setdefault("max", 2**31 - 1)
        super().__init__(url_map, *args, **kwargs)


def create_app(test_config: dict | None = None) -> Flask:
    settings = get_settings()
    app = Flask(__name__)
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
    app.config.setdefault("RATELIMIT_STORAGE_URI", settings.redis_url or "memory://")
    app.config.setdefault("RATELIMIT_HEADERS_ENABLED", True)
    # If Redis is briefly down, logins still work (unlimited) rather than failing.
    app.config.setdefault("RATELIMIT_SWALLOW_ERRORS", True)

    csrf.init_app(app)
    from web.charts import duration

    app.jinja_env.filters["duration"] = duration
    from web import admin, api, auth, cases, db, heatmaps, inputs

    db.init_app(app)
    auth.init_app(app)
    inputs.init_app(app)
    app.register_blueprint(auth.bp)
    app.register_blueprint(cases.bp)
    app.register_blueprint(api.bp)
    app.register_blueprint(admin.bp)
    app.register_blueprint(heatmaps.bp)

    @app.errorhandler(413)
    def too_large(_exc):
        limit = settings.max_upload_mb
        message = f"the upload is larger than the {limit} MB limit"
        if _wants_json():
            return jsonify(error=message), 413
        return message, 413

    @app.errorhandler(400)
    def bad_request(exc):
        message = exc.description or "the request could not be understood"
        if _wants_json():
            return jsonify(error=message), 400
        return render_template("error.html", message=message), 400

    @app.errorhandler(404)
    @app.errorhandler(403)
    @app.errorhandler(405)
    def http_error(exc):
        messages = {403: "this needs an administrator", 404: "not found, or not yours",
                    405: "this address does not accept that method"}
        if _wants_json():
            return jsonify(error=messages[exc.code]), exc.code
        return render_template("error.html", message=messages[exc.code]), exc.code

    @app.errorhandler(500)
    def server_error(exc):
        logger.error("unhandled error on %s: %s", request.path, getattr(exc, "original_exception", exc))
        if _wants_json():
            return jsonify(error="the server failed; the error was logged, please try again"), 500
        return render_template("error.html", message="The server failed; the error was logged."), 500

    @app.errorhandler(429)
    def too_many(exc):
        message = getattr(exc, "description", None) or "too many requests"
        if _wants_json():
            return jsonify(error=message), 429
        return render_template("error.html", message=message), 429

    @app.errorhandler(CSRFError)
    def csrf_error(exc):
        if _wants_json():
            return jsonify(error=f"CSRF check failed: {exc.description}"), 400
        return f"CSRF check failed: {exc.description}", 400

    @app.after_request
    def security_headers(response):
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; frame-ancestors 'none'")
        return response

    @app.get("/healthz")
    def healthz():
        g.skip_login = True
        return jsonify(status="ok")

    return app


def _wants_json() -> bool:
    return request.path.startswith("/api/") or request.accept_mimetypes.best == "application/json" \
        or request.headers.get("X-Requested-With") == "fetch"

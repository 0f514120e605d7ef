"""Refusing a request: one answer in JSON or HTML as the client wants, and the app's error handlers.

The one error type for refusals is :class:`shared.services.Refusal` (the services raise it too)."""
from __future__ import annotations

import logging

from flask import Flask, flash, g, jsonify, render_template, request
from flask_wtf.csrf import CSRFError

from shared.services import Refusal

logger = logging.getLogger(__name__)


def wants_json() -> bool:
    """The API, a ``fetch`` from the portal's pages, a client that asks for JSON, or a view told to answer JSON."""
    return bool(g.get("wants_json")) or request.path.startswith("/api/") \
        or request.accept_mimetypes.best == "application/json" or request.headers.get("X-Requested-With") == "fetch"


def refuse(message: str, status: int, page: bool = True, flash_it: bool = False):
    """The error as ``{"error": message}`` for JSON clients; else the error page (or plain text)."""
    if wants_json():
        return jsonify(error=message), status
    if flash_it:
        flash(message, "error")
    if page:
        return render_template("error.html", message=message), status
    return message, status


HTTP_MESSAGES = {403: "this needs an administrator", 404: "not found, or not yours",
                 405: "this address does not accept that method"}


def init_app(app: Flask, max_upload_mb: float) -> None:
    """Every error the portal and the API answer, in one shape."""
    app.register_error_handler(Refusal, lambda exc: refuse(exc.message, exc.status))
    app.register_error_handler(413, lambda _exc: refuse(_too_large(app, max_upload_mb), 413, page=False))
    app.register_error_handler(
        400, lambda exc: refuse(exc.description or "the request could not be understood", 400))
    for code, message in HTTP_MESSAGES.items():
        app.register_error_handler(code, lambda _exc, message=message, code=code: refuse(message, code))
    app.register_error_handler(429, lambda exc: refuse(getattr(exc, "description", None) or "too many requests", 429))
    app.register_error_handler(
        CSRFError, lambda exc: refuse(f"CSRF check failed: {exc.description}", 400, page=False))
    app.register_error_handler(500, _server_error)


def _too_large(app: Flask, max_upload_mb: float) -> str:
    limit = request.max_content_length or 0
    if limit > (app.config.get("MAX_CONTENT_LENGTH") or limit):  # an admin's archive import (web.PortalRequest)
        return (f"the archive is larger than the {(limit >> 20) - 1} MB limit (GESTALT_IMPORT_MAX_ARCHIVE_MB); split "
                "it, or import it on the server with `gestalt import photos`")
    return f"the upload is larger than the {max_upload_mb} MB limit"


def _server_error(exc):
    logger.error("unhandled error on %s: %s", request.path, getattr(exc, "original_exception", exc))
    if wants_json():
        return jsonify(error="the server failed; the error was logged, please try again"), 500
    return render_template("error.html", message="The server failed; the error was logged."), 500

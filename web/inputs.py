"""One gate for every piece of text a request brings: query parameters, form fields, file names and JSON.

PostgreSQL text cannot hold NUL characters, UTF-8 cannot encode unpaired surrogates, and Python's
JSON parser recurses once per nesting level. Rather than guard each view, every request passes
through :func:`check_request` first: a value that breaks one of these rules is a 400 naming the
field, before any view or database sees it. JSON bodies are bounded in size and depth.
"""
from __future__ import annotations

import json
import re
from typing import Any

from flask import Flask, current_app, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import BadRequest

MAX_JSON_BYTES = 1024 * 1024
MAX_JSON_DEPTH = 32
_SURROGATE = re.compile("[\ud800-\udfff]")


class InputRejected(BadRequest):
    """A request value no field may hold; the message names the field."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field} {problem}")
        self.field = field


def text_problem(value: str) -> str | None:
    """Why ``value`` cannot be stored as text, or None."""
    if "\x00" in value:
        return "contains a NUL character"
    if _SURROGATE.search(value):
        return "contains an unpaired surrogate (not valid Unicode)"
    return None


def _check_text(field: str | None, value: str | None) -> None:
    if value is None:  # a multipart part without a usable name
        return
    problem = text_problem(value)
    if problem:
        raise InputRejected(_printable(field or "a field"), problem)


def _printable(field: str) -> str:
    """A field name fit for an error message (it may itself be the hostile part)."""
    cleaned = _SURROGATE.sub("\ufffd", field.replace("\x00", "\\0"))
    return cleaned[:60]


def _walk_json(value: Any, path: str, depth: int = 0) -> None:
    if depth > MAX_JSON_DEPTH:
        raise InputRejected("body", f"JSON nested more than {MAX_JSON_DEPTH} levels deep")
    if isinstance(value, str):
        _check_text(path or "body", value)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(f"{path}.{key}" if path else key, key)
            _walk_json(item, f"{path}.{key}" if path else key, depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _walk_json(item, f"{path}[{index}]", depth + 1)


class GuardedJSONProvider(DefaultJSONProvider):
    """Flask's JSON, where a body nested past Python's recursion limit is a decoding error, not a crash."""

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        try:
            return json.loads(s, **kwargs)
        except RecursionError:
            raise ValueError("the JSON is nested too deeply") from None


def check_request() -> None:
    """Refuse a request carrying text that no field may hold (see the module's docstring)."""
    for key, value in request.args.items(multi=True):
        _check_text(key, key)
        _check_text(key, value)
    if request.method in ("GET", "HEAD", "OPTIONS"):
        return
    if request.is_json:
        if (request.content_length or 0) > MAX_JSON_BYTES:
            raise InputRejected("body", f"a JSON body has at most {MAX_JSON_BYTES // 1024} KB")
        data = request.get_data(cache=True)
        if data:
            try:
                body = current_app.json.loads(data)
            except ValueError as exc:
                raise InputRejected("body", f"is not valid JSON ({exc})") from None
            _walk_json(body, "")
        return
    for key, value in request.form.items(multi=True):
        _check_text(key, key)
        _check_text(key, value)
    for key, upload in request.files.items(multi=True):
        _check_text(key, key)
        _check_text(f"{key} (file name)", upload.filename or "")


def init_app(app: Flask) -> None:
    """Install the JSON provider and the check; call it after the login check, so anonymous requests are
    answered by the login rule before their bodies are read."""
    app.json = GuardedJSONProvider(app)
    app.before_request(check_request)

"""The OpenAPI 3.1 document of the JSON API, generated from Flask's URL map and the pydantic models.

Every route under ``/api/`` is an operation, found in the URL map, so a new route is in the document the moment
it is registered. What the map cannot say a view says with :func:`operation`: the models of its body, query and
answers (:mod:`web.schemas` validates requests with them, :mod:`web.responses` describes the answers) and the
errors of its own. Everything else is read from the app: path parameters from the route's converters, summary and
description from the view's docstring, the login every route needs (:mod:`web.auth`: a token or a session), 403 for
the routes behind :func:`web.auth.admin_required`, 429 with ``Retry-After`` where Flask-Limiter limits the route
(and the limit itself), 404 where the path names a row, 413 where a body comes. The models' JSON schemas come from
pydantic (:func:`pydantic.json_schema.models_json_schema`): a field's type, limits, default and description are
written in its model, nowhere else. A route no :func:`operation` describes is still listed, marked
``x-undocumented`` (the tests refuse that).
"""
from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, models_json_schema
from werkzeug.routing import Rule

from web.responses import Error

PREFIX = "/api/"
IGNORED_METHODS = {"HEAD", "OPTIONS"}
SECURITY = [{"bearer": []}, {"session": []}]
_PARAM = re.compile(r"<(?:(\w+)(?:\((.*?)\))?:)?(\w+)>")

ERRORS = {
    400: "The request is malformed: a field is missing, of the wrong type, out of range or holding text that cannot "
         "be stored (the message names it); for a portal session, also a missing CSRF token",
    401: "No valid login: send a token (`Authorization: Bearer gst_...`) or the portal's session cookie",
    403: "The account must choose a new password in the portal first",
    404: "No such record, or not the caller's (another clinician's case is not revealed)",
    413: "The request body is larger than this address accepts",
    429: "Too many requests",
}


@dataclass(frozen=True)
class Operation:
    """What a view answers and takes beyond what the URL map says (see the module's docstring)."""

    responses: Mapping[int, type[BaseModel] | str]  # a model (JSON), or the media type of a body of another kind
    body: type[BaseModel] | None = None  # application/json
    form: type[BaseModel] | None = None  # multipart/form-data
    query: type[BaseModel] | None = None
    errors: Mapping[int, str] = field(default_factory=dict)  # statuses of the view's own, and when they come


def operation(responses: Mapping[int, type[BaseModel] | str], *, body: type[BaseModel] | None = None,
              form: type[BaseModel] | None = None, query: type[BaseModel] | None = None,
              errors: Mapping[int, str] | None = None) -> Callable:
    """Describe a view for the API's document; put it right under the route decorator."""
    described = Operation(dict(responses), body, form, query, dict(errors or {}))

    def mark(view: Callable) -> Callable:
        view.openapi = described  # type: ignore[attr-defined]
        return view
    return mark


def document(app: Flask) -> dict:
    """The app's API document, built once per app."""
    if "openapi" not in app.extensions:
        app.extensions["openapi"] = build(app)
    return app.extensions["openapi"]


class _Schemas(GenerateJsonSchema):
    """pydantic's JSON schemas without a title per field (the field's name says it)."""

    def field_title_should_be_set(self, schema) -> bool:
        return False


def api_routes(app: Flask) -> list[tuple[Rule, str]]:
    """Every (rule, method) of the API, in the URL map's order."""
    return [(rule, method) for rule in app.url_map.iter_rules() if rule.rule.startswith(PREFIX)
            for method in sorted(rule.methods - IGNORED_METHODS)]


def build(app: Flask) -> dict:
    routes = [(rule, method, described(app.view_functions[rule.endpoint])) for rule, method in api_routes(app)]
    ops = [op for _, _, op in routes if op is not None]
    requests = {m for op in ops for m in (op.body, op.form, op.query) if m is not None}
    answers = {Error} | {m for op in ops for m in op.responses.values() if isinstance(m, type)}
    modes = [(m, "validation") for m in requests] + [(m, "serialization") for m in answers]
    refs, top = models_json_schema(sorted(modes, key=lambda mm: (mm[0].__name__, mm[1])),
                                   ref_template="#/components/schemas/{model}", schema_generator=_Schemas)
    schemas = {m: refs[m, mode] for m, mode in modes}  # a model both asked and answered: its answer's schema
    paths: dict[str, dict] = {}
    names = _operation_ids(routes)
    for (rule, method, op), name in zip(routes, names, strict=True):
        paths.setdefault(path_template(rule.rule), {})[method.lower()] = _operation(
            app, rule, method, op, schemas, top["$defs"], name)
    return {
        "openapi": "3.1.0",
        "info": {"title": "Gestalt API", "version": "1", "description": _INFO},
        "paths": paths,
        "components": {"schemas": top["$defs"], "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "A per-user API token (`gst_...`): "
                       "`gestalt tokens create --email E`; it expires (GESTALT_TOKEN_DAYS) and can be revoked"},
            "session": {"type": "apiKey", "in": "cookie", "name": app.config.get("SESSION_COOKIE_NAME", "session"),
                        "description": "The portal's login (the browser's session cookie); a request other than "
                                       "GET also needs the page's CSRF token in `X-CSRFToken`"}}},
        "security": SECURITY,
    }


_INFO = ("Cases, photos, results and diagnoses of the Gestalt portal, as JSON. Every operation needs a login: a "
         "per-user token (`Authorization: Bearer gst_...`) or the portal's session. A clinician reaches their own "
         "cases only (another's is a 404), an administrator every case. Errors are `{\"error\": \"...\"}`, naming "
         "the field that is wrong. Rate-limited operations answer 429 with `Retry-After`.")


def described(view: Callable) -> Operation | None:
    return getattr(view, "openapi", None)


def path_template(rule: str) -> str:
    """``/api/v1/cases/<int:case_id>`` as ``/api/v1/cases/{case_id}``."""
    return _PARAM.sub(r"{\3}", rule)


def _operation_ids(routes: list) -> list[str]:
    """The view's name (its blueprint's too where two blueprints share one), with the method where one view answers
    several."""
    names = [rule.endpoint.rsplit(".", 1)[-1] for rule, _, _ in routes]
    ids = []
    for (rule, method, _), name in zip(routes, names, strict=True):
        shared = any(n == name and r.endpoint != rule.endpoint for (r, _, _), n in zip(routes, names, strict=True))
        name = rule.endpoint.replace(".", "_") if shared else name
        ids.append(f"{name}_{method.lower()}" if len(rule.methods - IGNORED_METHODS) > 1 else name)
    return ids


def _operation(app: Flask, rule: Rule, method: str, op: Operation | None, schemas: dict, defs: dict,
               operation_id: str) -> dict:
    view = app.view_functions[rule.endpoint]
    summary, _, description = (inspect.getdoc(view) or rule.endpoint).partition("\n\n")
    summary = " ".join(summary.split())
    out: dict = {"operationId": operation_id, "summary": summary, "tags": [_tag(rule.rule)]}
    admin = _admin_only(app, rule, view)
    if description.strip() or admin:
        out["description"] = " ".join(p for p in (description.strip(), admin and "Administrators only.") if p)
    out["parameters"] = _path_parameters(app, rule) + (_query_parameters(defs, schemas[op.query]) if op and op.query
                                                       else [])
    if op and (op.body or op.form):
        kind, model = ("application/json", op.body) if op.body else ("multipart/form-data", op.form)
        out["requestBody"] = {"required": True, "content": {kind: {"schema": schemas[model]}}}
    out["security"] = [] if rule.endpoint in _public_endpoints() else SECURITY
    out["responses"] = _responses(app, rule, view, op, schemas, admin)
    if op is None:
        out["x-undocumented"] = True
    return out


def _tag(rule: str) -> str:
    parts = [p for p in rule[len(PREFIX):].split("/") if p and not p.startswith("<")]
    return parts[1] if len(parts) > 1 else "api"


def _responses(app: Flask, rule: Rule, view: Callable, op: Operation | None, schemas: dict, admin: bool) -> dict:
    out: dict = {}
    for status, answer in (op.responses if op else {}).items():
        if isinstance(answer, str):
            text = answer.startswith("text/")
            body = {answer: {"schema": {"type": "string"} if text else {"type": "string", "contentMediaType": answer}}}
        elif status >= 400 and answer is not Error:  # the app's error handlers answer any status with an Error too
            body = {"application/json": {"schema": {"anyOf": [schemas[answer], schemas[Error]]}}}
        else:
            body = {"application/json": {"schema": schemas[answer]}}
        out[str(status)] = {"description": _first_line(answer) or HTTPStatus(status).phrase, "content": body}
    if op is None:
        out["default"] = {"description": "Not described yet (no web.openapi.operation on the view)"}
    errors = {400: ERRORS[400]}
    if rule.endpoint not in _public_endpoints():
        errors |= {401: ERRORS[401], 403: ERRORS[403] + ("; or the account is not an administrator" if admin else "")}
    if rule.arguments:
        errors[404] = ERRORS[404]
    if op and (op.body or op.form):
        errors[413] = ERRORS[413]
    limits = _rate_limits(app, rule, view)
    if limits:
        errors[429] = f"{ERRORS[429]} (at most {'; '.join(limits)} per account): wait the seconds Retry-After says"
    errors |= dict(op.errors) if op else {}
    for status, text in sorted(errors.items()):
        out.setdefault(str(status), {"description": text,
                                     "content": {"application/json": {"schema": schemas[Error]}}})
        if status == 429:
            out["429"]["headers"] = {"Retry-After": {"description": "Seconds until the limit lets a request through",
                                                     "schema": {"type": "integer"}}}
    return out


def _first_line(answer: type[BaseModel] | str) -> str:
    if isinstance(answer, str) or answer.__doc__ is None:
        return ""
    return inspect.cleandoc(answer.__doc__).split("\n\n")[0].replace("\n", " ")


def _path_parameters(app: Flask, rule: Rule) -> list[dict]:
    from werkzeug.routing import FloatConverter, IntegerConverter
    from werkzeug.routing.rules import parse_converter_args

    params = []
    for converter, args, name in _PARAM.findall(rule.rule):
        positional, keywords = parse_converter_args(args) if args else ((), {})
        conv = app.url_map.converters[converter or "default"](app.url_map, *positional, **keywords)
        if isinstance(conv, IntegerConverter):
            schema = {"type": "integer", "minimum": conv.min if conv.min is not None else None if conv.signed else 0}
            schema |= {"maximum": conv.max} if conv.max is not None else {}
            schema = {k: v for k, v in schema.items() if v is not None}
        elif isinstance(conv, FloatConverter):
            schema = {"type": "number"}
        else:
            schema = {"type": "string", "pattern": f"^{conv.regex}$"}
        params.append({"name": name, "in": "path", "required": True, "schema": schema})
    return params


def _query_parameters(defs: dict, ref: dict) -> list[dict]:
    model = defs[ref["$ref"].rsplit("/", 1)[-1]]
    required = set(model.get("required", ()))
    out = []
    for name, schema in model.get("properties", {}).items():
        param = {"name": name, "in": "query", "required": name in required, "schema": schema}
        if "description" in schema:
            param["description"] = schema["description"]
        out.append(param)
    return out


def _public_endpoints() -> set[str]:
    from web.auth import PUBLIC_ENDPOINTS

    return PUBLIC_ENDPOINTS


def _admin_only(app: Flask, rule: Rule, view: Callable) -> bool:
    """Behind :func:`web.auth.admin_required`: on the view (through its decorators) or its blueprint's check."""
    from web.auth import admin_required

    marker = admin_required(lambda: None).__code__
    blueprint = rule.endpoint.rpartition(".")[0]
    candidates = [view, *app.before_request_funcs.get(blueprint, ())] if blueprint else [view]
    for fn in candidates:
        while fn is not None:
            if getattr(fn, "__code__", None) is marker:
                return True
            fn = getattr(fn, "__wrapped__", None)
    return False


def _rate_limits(app: Flask, rule: Rule, view: Callable) -> list[str]:
    """The Flask-Limiter limits of the route (decorated or its blueprint's), as "30 per 1 minute"."""
    from flask_limiter.util import get_qualified_name

    from web.limits import limiter

    blueprint = rule.endpoint.rpartition(".")[0]
    found = limiter.limit_manager.decorated_limits(get_qualified_name(view))
    found += limiter.limit_manager.blueprint_limits(app, blueprint) if blueprint else []
    return list(dict.fromkeys(str(limit.limit) for limit in found))

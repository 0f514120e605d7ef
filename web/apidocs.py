"""The API's document as a page (``/api/v1/docs``): operations and schemas as tables, rendered on the server.

The portal's content security policy runs no script from elsewhere, so the page is HTML made from the document
(:func:`web.openapi.document`) by ``templates/api_docs.html``, with no script at all.
"""
from __future__ import annotations

import json
import re

from markupsafe import Markup, escape

CONSTRAINTS = (("pattern", "pattern {}"), ("minLength", "at least {} characters"),
               ("maxLength", "at most {} characters"), ("minimum", "at least {}"), ("maximum", "at most {}"),
               ("minItems", "at least {} items"), ("maxItems", "at most {} items"),
               ("contentMediaType", "{}"), ("format", "{}"))


_CODE = re.compile(r"``(.+?)``|`([^`]+)`")


def text(words: str) -> Markup:
    """Prose of the document with its code spans (Markdown's `x`, the docstrings' ``x``) as code."""
    out, last = [], 0
    for match in _CODE.finditer(words):
        out += [escape(words[last:match.start()]), Markup("<code>{}</code>").format(match.group(1) or match.group(2))]
        last = match.end()
    return Markup("").join([*out, escape(words[last:])])


def _name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def type_label(schema: dict) -> Markup:
    """A schema as a short type, with links to the schemas it names."""
    if "$ref" in schema:
        return Markup('<a href="#schema-{0}">{0}</a>').format(_name(schema["$ref"]))
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return Markup(" or ").join(type_label(s) for s in schema[key])
    if "const" in schema:
        return Markup("<code>{}</code>").format(json.dumps(schema["const"]))
    if "enum" in schema:
        return Markup(" | ").join(Markup("<code>{}</code>").format(json.dumps(v)) for v in schema["enum"])
    kind = schema.get("type")
    if kind == "array" and "prefixItems" in schema:
        return Markup("[{}]").format(Markup(", ").join(type_label(s) for s in schema["prefixItems"]))
    if kind == "array":
        return Markup("list of {}").format(type_label(schema.get("items", {})))
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return Markup("map of text to {}").format(type_label(schema["additionalProperties"]))
    return Markup("{}").format(kind or "any value")


def notes(schema: dict) -> str:
    """The limits and default of a schema (of its non-null alternative), in words."""
    parts = [text.format(schema[key]) for key, text in CONSTRAINTS if key in schema]
    for alternative in schema.get("anyOf", ()):
        parts += [text.format(alternative[key]) for key, text in CONSTRAINTS if key in alternative]
    if "default" in schema:
        parts.append(f"default {json.dumps(schema['default'])}")
    return "; ".join(parts)


def _fields(schema: dict) -> list[dict]:
    required = set(schema.get("required", ()))
    return [{"name": name, "type": type_label(prop), "required": name in required, "notes": notes(prop),
             "description": text(prop.get("description", ""))} for name, prop in schema.get("properties", {}).items()]


def _operation(path: str, method: str, op: dict) -> dict:
    body = next(iter(op.get("requestBody", {}).get("content", {}).items()), None)
    return {
        "id": op["operationId"], "method": method.upper(), "path": path, "summary": op.get("summary", ""),
        "description": text(op.get("description", "")), "login": bool(op.get("security")),
        "parameters": [{"name": p["name"], "in": p["in"], "required": p.get("required", False),
                        "type": type_label(p["schema"]), "notes": notes(p["schema"]),
                        "description": text(p.get("description", ""))} for p in op.get("parameters", ())],
        "body": {"media": body[0], "type": type_label(body[1]["schema"])} if body else None,
        "responses": [{"status": status, "description": text(answer["description"]),
                       "media": ", ".join(answer.get("content", {})),
                       "type": Markup(", ").join(type_label(c["schema"]) for c in answer.get("content", {}).values()),
                       "headers": ", ".join(answer.get("headers", {}))} for status, answer in op["responses"].items()],
    }


def page(document: dict) -> dict:
    """What ``api_docs.html`` shows: the document's operations in order, and its schemas by name."""
    operations = [_operation(path, method, op) for path, methods in document["paths"].items()
                  for method, op in methods.items()]
    schemas = [{"name": name, "description": text(schema.get("description", "")), "fields": _fields(schema),
                "type": None if "properties" in schema else type_label(schema)}
               for name, schema in sorted(document["components"]["schemas"].items())]
    info = {**document["info"], "description": text(document["info"]["description"])}
    security = {name: text(scheme["description"]) for name, scheme in document["components"]["securitySchemes"].items()}
    return {"info": info, "operations": operations, "schemas": schemas, "security": security}

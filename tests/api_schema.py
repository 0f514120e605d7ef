"""Real answers of the API against the OpenAPI document the server serves: the status is one the operation lists,
the media type one it gives for that status, and a JSON body valid under its schema (jsonschema, JSON Schema
2020-12 as OpenAPI 3.1 uses it, formats checked). ``Portal.case`` checks every case it reads with this."""
from __future__ import annotations

import re

import requests
from jsonschema import Draft202012Validator

_documents: dict[str, dict] = {}


def served_document(http: requests.Session, base: str) -> dict:
    """The document at ``base`` (read once per server, with any login)."""
    if base not in _documents:
        r = http.get(f"{base}/api/v1/openapi.json")
        r.raise_for_status()
        _documents[base] = r.json()
    return _documents[base]


def find_operation(document: dict, method: str, path: str) -> tuple[str, dict]:
    """The path template and the operation that answer ``method path``."""
    for template, operations in document["paths"].items():
        pattern = "^" + re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in operations:
            return template, operations[method.lower()]
    raise AssertionError(f"{method} {path} is not in the API's document")


def schema_validator(document: dict, schema: dict) -> Draft202012Validator:
    """A validator of ``schema``, whose references point into the document's components."""
    root = {**schema, "components": document["components"]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def check(document: dict, response: requests.Response) -> dict | None:
    """Assert that ``response`` is what the document says its operation answers; its JSON body, if any."""
    method, path = response.request.method, response.request.path_url.split("?")[0]
    template, op = find_operation(document, method, path)
    where = f"{method} {template} -> {response.status_code}"
    answer = op["responses"].get(str(response.status_code))
    assert answer is not None, f"{where}: the document lists {sorted(op['responses'])}: {response.text[:300]}"
    media = response.headers.get("Content-Type", "").split(";")[0]
    assert media in answer.get("content", {}), f"{where}: {media} is not one of {list(answer.get('content', {}))}"
    for header in answer.get("headers", {}):
        assert header in response.headers, f"{where}: no {header} header"
    if media != "application/json":
        return None
    body = response.json()
    errors = sorted(schema_validator(document, answer["content"][media]["schema"]).iter_errors(body),
                    key=lambda e: list(e.absolute_path))
    assert not errors, f"{where}: " + "; ".join(
        f"at {'/'.join(map(str, e.absolute_path)) or 'the top'}: {e.message[:300]}" for e in errors[:5])
    return body


def check_answer(http: requests.Session, base: str, response: requests.Response) -> dict | None:
    return check(served_document(http, base), response)

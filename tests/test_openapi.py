"""The API's OpenAPI document is generated from the URL map and the pydantic models: every /api/ route is in it and
nothing else, it is valid OpenAPI 3.1, every model field appears in it, a new route or field gets in by itself, and
real answers of the server validate against it. Its page renders it behind the login."""
from __future__ import annotations

import io
import re
import typing

import pytest
import requests
from flask import Blueprint, jsonify
from PIL import Image
from pydantic import BaseModel, Field
from pydantic_core import PydanticUndefined
from skimage import data

from shared.db import session_scope
from shared.users import create_token, find_user
from tests.api_schema import check, find_operation, served_document
from tests.conftest import Portal, new_user

ROUTE_PARAM = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


@pytest.fixture(scope="module")
def app():
    from web import create_app

    return create_app({"TESTING": True, "SECRET_KEY": "k" * 32})


def _api_routes(flask_app) -> set[tuple[str, str]]:
    """(method, path template) of every /api/ route in Flask's URL map, read here independently of the builder."""
    return {(method, ROUTE_PARAM.sub(r"{\1}", rule.rule)) for rule in flask_app.url_map.iter_rules()
            if rule.rule.startswith("/api/") for method in rule.methods - {"HEAD", "OPTIONS"}}


def _documented(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


def test_every_api_route_is_in_the_document_and_nothing_else(app):
    from web.openapi import document

    doc = document(app)
    routes = _api_routes(app)
    assert len(routes) >= 15
    assert _documented(doc) == routes, {"missing": routes - _documented(doc), "extra": _documented(doc) - routes}
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert not op.get("x-undocumented"), f"{where}: its view has no @web.openapi.operation(...)"
            assert op["summary"] and op["security"], where
            ok = [s for s in op["responses"] if s.startswith("2")]
            assert ok and all(op["responses"][s]["content"] for s in ok), where
            assert {"400", "401", "403"} <= set(op["responses"]), where
            assert ("{" in path) == ("404" in op["responses"]), where


def test_the_document_is_valid_openapi_3_1(app):
    from openapi_spec_validator import validate

    from web.openapi import document

    doc = document(app)
    assert doc["openapi"] == "3.1.0"
    validate(doc)


def _models(annotation) -> set[type[BaseModel]]:
    """The pydantic models an annotation names, nested ones included."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found = {annotation}
        for info in annotation.model_fields.values():
            found |= _models(info.annotation)
        return found
    return {m for arg in typing.get_args(annotation) for m in _models(arg)}


def test_every_field_of_every_model_is_in_the_document(app):
    """The document holds each model of every operation (request, query and answer, nested ones too) with exactly
    its fields, each field's description and default as the model gives them."""
    from web.openapi import described, document

    doc = document(app)
    schemas = doc["components"]["schemas"]
    models: set[type[BaseModel]] = set()
    for view in app.view_functions.values():
        op = described(view)
        if op is not None:
            for model in (op.body, op.form, op.query, *op.responses.values()):
                models |= _models(model) if isinstance(model, type) else set()
    assert len(models) >= 30
    for model in models:
        schema = schemas[model.__name__]
        fields = {info.alias or name: info for name, info in model.model_fields.items()}
        assert set(schema["properties"]) == set(fields), model.__name__
        for name, info in fields.items():
            prop = schema["properties"][name]
            assert prop.get("description") == info.description, (model.__name__, name)
            if info.default is not None and info.default is not PydanticUndefined:
                assert prop["default"] == info.default, (model.__name__, name)


class Probe(BaseModel):
    """A probe's body."""

    size: int = Field(3, ge=1, description="how big")


class BiggerProbe(Probe):
    colour: str = Field("red", max_length=8, description="a field added later")


class ProbeAnswer(BaseModel):
    """What a probe answers."""

    id: int


class ProbeProblems(BaseModel):
    """Every problem of a refused probe."""

    error: str
    problems: list[str]


def test_a_new_route_and_a_new_field_get_into_the_document():
    """A route registered later, under another blueprint, with a model subclass that adds a field: the document has
    the route, the field (limits, default, description), its answer, the admin-only 403 and the rate limit's 429; a
    route no operation describes is listed and marked."""
    from web import create_app, limits
    from web.auth import admin_required
    from web.openapi import document, operation

    bp = Blueprint("probe", __name__, url_prefix="/api/v1/probes")

    @bp.post("/<int:probe_id>")
    @operation({201: ProbeAnswer, 400: ProbeProblems}, body=BiggerProbe, errors={409: "the probe is busy"})
    @admin_required
    @limits.rescores
    def make_probe(probe_id: int):
        """Make a probe

        Longer words about probes."""
        return jsonify(id=probe_id), 201

    @bp.get("/plain")
    def plain():
        return jsonify()

    flask_app = create_app({"TESTING": True, "SECRET_KEY": "k" * 32})
    flask_app.register_blueprint(bp)
    doc = document(flask_app)
    assert _documented(doc) == _api_routes(flask_app)
    op = doc["paths"]["/api/v1/probes/{probe_id}"]["post"]
    assert (op["summary"], op["description"]) == ("Make a probe", "Longer words about probes. Administrators only.")
    assert op["parameters"] == [{"name": "probe_id", "in": "path", "required": True,
                                 "schema": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}]
    body = doc["components"]["schemas"]["BiggerProbe"]
    assert op["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/BiggerProbe"}
    assert body["properties"]["colour"] == {"type": "string", "maxLength": 8, "default": "red",
                                            "description": "a field added later"}
    assert body["properties"]["size"]["minimum"] == 1
    assert op["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/ProbeAnswer")
    assert "administrator" in op["responses"]["403"]["description"]
    assert op["responses"]["409"]["description"] == "the probe is busy"
    refused = op["responses"]["400"]  # the view's own refusal, or the app's error handlers' (a NUL in a field, say)
    assert refused["description"] == "Every problem of a refused probe." and refused["content"]["application/json"][
        "schema"] == {"anyOf": [{"$ref": "#/components/schemas/ProbeProblems"}, {"$ref": "#/components/schemas/Error"}]}
    limited = op["responses"]["429"]
    assert "Retry-After" in limited["headers"] and "per 1 minute" in limited["description"]
    assert doc["paths"]["/api/v1/probes/plain"]["get"]["x-undocumented"] is True


@pytest.fixture(scope="module")
def token(engines):
    email = new_user()
    with session_scope() as s:
        _, secret = create_token(s, find_user(s, email), "openapi-test")
    return secret


def _photo() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG")
    return buf.getvalue()


def test_real_answers_match_the_document(web_server, token):
    """Each operation's answers, success and refusal, through gunicorn: status, media type and body as documented."""
    from tests.test_catalog import ensure_catalog

    ensure_catalog()  # HPO terms and syndromes to find (loaded once per test session)
    api = f"{web_server}/api/v1"
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {token}"
    doc = served_document(http, web_server)
    answers = [http.get(f"{api}/openapi.json"), http.get(f"{api}/docs"), requests.get(f"{api}/cases")]
    created = http.post(f"{api}/cases", json={"patient_ref": "PT-DOC", "age_years": 3.5, "ancestry": "Basque"})
    case = f"{api}/cases/{created.json()['id']}"
    answers += [created, http.post(f"{api}/cases", json={"patient_ref": "PT-DOC", "sex": "F"}),
                http.patch(case, json={"sex": "female", "age_years": None}), http.patch(case, json={"sex": None}),
                http.post(f"{case}/images", files={"photo": ("a.jpg", _photo())}),
                http.post(f"{case}/images", files={"photo": ("a.jpg", b"not an image")}),
                http.post(f"{case}/images", files={"photo": ("big.jpg", b"x" * (4 << 20))}),
                http.get(case), http.get(case, params={"poll": "1"}), http.get(f"{api}/cases"),
                http.get(f"{api}/cases/2147483647"),
                http.post(f"{case}/diagnosis", json={"syndrome": "OMIM:147920", "gene": "KMT2D", "consent": True}),
                http.patch(f"{case}/diagnosis", json={"consent": "yes"}), http.get(f"{case}/phenopacket"),
                http.get(f"{api}/hpo", params={"q": "hyperte", "limit": 5}),
                http.get(f"{api}/hpo", params={"limit": 0}),
                http.get(f"{api}/syndromes", params={"q": "kabuki"}),
                http.get(f"{api}/syndromes", params={"q": "x", "limit": "many"})]
    image = f"{api}/images/{http.get(case).json()['images'][0]['id']}"
    # The second rescore finds the photo queued again by the first (409), whatever the first found.
    answers += [http.get(image), http.get(f"{image}/aligned"), http.post(f"{image}/rescore"),
                http.post(f"{image}/rescore"),
                http.get(f"{case}/images/{image.rsplit('/', 1)[1]}/heatmap.png", params={"syndrome": "0"}),
                http.get(f"{case}/images/{image.rsplit('/', 1)[1]}/heatmap.png")]
    statuses = set()
    for answer in answers:
        check(doc, answer)
        statuses.add((answer.request.method, find_operation(doc, answer.request.method,
                                                            answer.request.path_url.split("?")[0])[0],
                      answer.status_code))
    assert {s for _, _, s in statuses} >= {200, 201, 400, 401, 404, 409, 413, 415}, statuses
    clinicians = {(m.upper(), p) for p, ops in doc["paths"].items() for m, op in ops.items()
                  if "Administrators only." not in op.get("description", "")}
    assert {(m, p) for m, p, _ in statuses} >= clinicians, "every operation a clinician may use was asked"
    found = {a.request.path_url.split("?")[0].rsplit("/", 1)[1]: a.json() for a in answers if a.status_code == 200
             and a.request.path_url.startswith(("/api/v1/hpo?", "/api/v1/syndromes?"))}
    assert found["hpo"]["terms"] and found["syndromes"]["syndromes"], "the searches found something to check"
    assert http.get(f"{api}/hpo", params={"limit": 0}).json()["error"] == "limit must be at least 1"
    assert http.patch(case, json={"sex": None}).json()["error"] == "sex cannot be null (leave it out instead)"


def test_a_rate_limited_answer_says_when_to_retry(web_server):
    """Rescoring is limited per account: past the limit, a 429 as documented, with Retry-After."""
    user = Portal(web_server, new_user())
    case_id = user.create_case("PT-DOC-429")
    image_id = user.upload(case_id, [("a.jpg", _photo())]).json()["images"][0]["id"]
    token = user.csrf("/")
    doc = served_document(user.http, web_server)
    for _ in range(40):
        r = user.http.post(f"{web_server}/api/v1/images/{image_id}/rescore", headers={"X-CSRFToken": token})
        if r.status_code == 429:
            break
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    check(doc, r)


def test_the_docs_page_renders_the_document_behind_the_login(web_server):
    anonymous = requests.get(f"{web_server}/api/v1/docs")
    assert anonymous.status_code == 401
    user = Portal(web_server, new_user())
    page = user.http.get(f"{web_server}/api/v1/docs")
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    assert not re.search(r"<script[^>]+src=\"(https?:)?//", page.text), "no script from elsewhere"
    doc = served_document(user.http, web_server)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert f'id="op-{op["operationId"]}"' in page.text and f"{method.upper()} {path}" in page.text
    for name in doc["components"]["schemas"]:
        assert f'id="schema-{name}"' in page.text, name
    # A field's limits and description come from its model.
    assert "at most 120" in page.text and "A pseudonymous ID" in page.text
    assert 'href="/api/v1/docs"' in user.http.get(f"{web_server}/").text, "the portal links the page"

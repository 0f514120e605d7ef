"""The API's requests as pydantic models: bodies strict (a JSON boolean is a boolean, a number a number), query
strings read as text is read.

``"consent": "no"`` is not a truthy string but a 400 that names the field; so is a number sent as
text, a string longer than its column, or a value outside its range. Views call :func:`parse` and
get a model, or an :class:`web.inputs.InputRejected` that the app answers with 400.

These models are also the API's document (:mod:`web.openapi` generates it from them): a field's type, limits,
default and description are written here and nowhere else.
"""
from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, WithJsonSchema
from werkzeug.datastructures import FileStorage

from shared.services.diagnoses import DIAGNOSIS_KINDS, GENE_MAX, VARIANT_MAX
from shared.services.heatmaps import ALL as ALL_REGIONS
from web.inputs import InputRejected

SEXES = ("female", "male", "other", "unknown")
PATIENT_REF_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
PATIENT_REF_RULE = "1-64 letters, digits, '.', '_' or '-' (a pseudonymous ID, no names)"
ANCESTRY_MAX = 64
AGE_MAX = 120
SEARCH_MAX = 50

Model = TypeVar("Model", bound=BaseModel)


def _left_out_keeps_value(schema: dict) -> None:
    """A field that defaults to None but takes no null is one a request may leave out (its stored value stays): the
    document shows no default for it, as JSON could not send that default."""
    for prop in schema.get("properties", {}).values():
        nullable = prop.get("type") == "null" or any(s.get("type") == "null" for s in prop.get("anyOf", ()))
        if "default" in prop and prop["default"] is None and not nullable:
            del prop["default"]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, str_strip_whitespace=True, extra="forbid",
                              json_schema_extra=_left_out_keeps_value)


class _Query(BaseModel):
    """Query parameters: text, read as the field's type ("20" is 20, "1" is true); others are ignored."""

    model_config = ConfigDict(str_strip_whitespace=True, extra="ignore")


PatientRef = Annotated[str, StringConstraints(pattern=PATIENT_REF_PATTERN), Field(
    description="A pseudonymous ID: 1-64 letters, digits, '.', '_' or '-'; never a name")]
Age = Annotated[Annotated[float, Field(ge=0, le=AGE_MAX)] | None, Field(description="Age in years (decimals allowed)")]
Ancestry = Annotated[Annotated[str, StringConstraints(max_length=ANCESTRY_MAX)] | None,
                     Field(description="Self-reported ancestry")]
_HpoTerms = Annotated[list[Annotated[str, StringConstraints(max_length=64)]], Field(max_length=200)]
HPO_TERMS = ("HPO term IDs such as HP:0000316, in any case; text after an ID (the autocomplete's label) is ignored. "
             "Unknown or malformed IDs are refused (400)")


class NewCase(_Strict):
    """A new case of the caller's."""

    patient_ref: PatientRef
    sex: Literal[SEXES] = "unknown"  # type: ignore[valid-type]
    age_years: Age = None
    ancestry: Ancestry = None
    hpo_terms: _HpoTerms = Field([], description=HPO_TERMS)


class CaseUpdate(_Strict):
    """Corrections to a case: fields left out keep their stored value; ``null`` clears ``age_years``, ``ancestry`` or
    ``hpo_terms``."""

    patient_ref: PatientRef = None  # type: ignore[assignment]
    sex: Literal[SEXES] = None  # type: ignore[valid-type,assignment]
    age_years: Age = None
    ancestry: Ancestry = None
    hpo_terms: _HpoTerms | None = Field(None, description=HPO_TERMS)


SyndromeRef = Annotated[str, StringConstraints(min_length=1, max_length=300)] | Annotated[int, Field(ge=1)]


class DiagnosisUpdate(_Strict):
    """The confirmed diagnosis. A case's first needs ``syndrome``; later updates change only the fields they name
    (``null`` or left out: the stored value stays, except ``gene`` and ``variant``, which ``null`` clears)."""

    syndrome: SyndromeRef | None = Field(None, description="A catalogue name or id, or an OMIM/Orphanet ID "
                                                           "(OMIM:122470, ORPHA:2322)")
    kind: Literal[DIAGNOSIS_KINDS] | None = Field(None, description="How it was confirmed")  # type: ignore[valid-type]
    gene: Annotated[str, StringConstraints(max_length=GENE_MAX)] | None = Field(None, description="HGNC symbol")
    variant: Annotated[str, StringConstraints(max_length=VARIANT_MAX)] | None = Field(None, description="HGVS")
    consent: bool | None = Field(None, description="A JSON boolean: true lets the photos train the next models; false "
                                                   "withdraws that consent (audited)")


# A file part of a multipart body: checked as an upload, described as binary.
Upload = Annotated[FileStorage, WithJsonSchema({"type": "string", "format": "binary"})]


class PhotoUpload(BaseModel):
    """Photos of a case (``multipart/form-data``): all are stored and queued, or none (the first bad one is named)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    photo: list[Upload] = Field(description="A photo (JPEG, PNG, HEIC, ...); repeat the part for several, up to "
                                            "GESTALT_MAX_PHOTOS_PER_REQUEST (20) in one request")


class SearchQuery(_Query):
    q: str = Field("", description="Text to look for (its first 100 characters); fewer than 2 find nothing")
    limit: int = Field(20, ge=1, le=SEARCH_MAX, description="How many to return at most")


class CaseQuery(_Query):
    poll: bool = Field(False, description="true (or 1) from a page that polls the case while its photos are "
                                          "processed: audited once per case and login, not at every read")


class HeatmapQuery(_Query):
    syndrome: str = Field(max_length=255, description="A class index in the model's class list, or the name of a "
                                                      "syndrome as the photo's ranking names it")
    region: str = Field(ALL_REGIONS, max_length=32, description="'all' (every member, weighted by its share of the "
                                                                "aggregate) or one of the model's members, e.g. "
                                                                "identity or upper_half")


def _limit_text(error: dict, key: str) -> str:
    return str(error.get("ctx", {}).get(key))


class PhotoImport(_Strict):
    """``POST /api/v1/admin/imports/photos`` and the admin console's import form (``multipart/form-data``): a zip of
    ``<syndrome>/<patient>/<photo>`` folders, each patient a case of ``owner`` with a confirmed, consented diagnosis."""

    model_config = ConfigDict(strict=True, str_strip_whitespace=True, extra="forbid", arbitrary_types_allowed=True)

    archive: Upload = Field(description="A .zip of <syndrome>/<patient>/<photo> folders (or of one folder holding "
                                        "them); its size, entries and compression are checked before it is unpacked")
    owner: Annotated[str, StringConstraints(min_length=3, max_length=254)] = Field(
        description="E-mail of the clinician who will own the cases")
    consent: Literal["yes"] = Field(description="'yes': every patient of the archive consented to the reuse of "
                                                "their photos (required)")
    kind: Literal[DIAGNOSIS_KINDS] = Field("clinical", description="How the diagnoses were confirmed")  # type: ignore[valid-type]
    labels: Upload | None = Field(None, description="CSV with the columns folder,syndrome: maps syndrome folders to "
                                                    "catalogue names or OMIM/ORPHA ids")


class ImportedCase(BaseModel):
    id: int
    external_id: str
    patient_ref: str
    syndrome: str
    photos: int


class PhotoImportResult(BaseModel):
    """201 with the cases created (200 when every patient was imported before)."""

    cases: list[ImportedCase]
    skipped: list[str] = Field(description="external ids of patients the owner had before: left as they are")
    photos: int = Field(description="photos stored and queued for the pipeline")


class ImportProblems(BaseModel):
    """400: nothing was imported."""

    error: str
    problems: list[str] = Field(description="one line per problem, with its path in the archive")


def _problem(error: dict) -> tuple[str, str]:
    """(field, what is wrong with it) for one pydantic error."""
    field = ".".join(str(part) for part in error["loc"] if not str(part).startswith(("function-", "constrained")))
    if error["loc"] and error["loc"][0] == "hpo_terms" and error["type"].endswith("_type"):
        return "hpo_terms", 'must be a list of HPO IDs such as "HP:0000316"'
    if error["type"] != "missing" and error.get("input", ...) is None:
        return field, "cannot be null (leave it out instead)"
    kinds = {"bool_type": "must be true or false (a JSON boolean)", "missing": "is required",
             "string_type": "must be text", "list_type": "must be a list",
             "float_type": "must be a number", "int_type": "must be a whole number",
             "int_from_float": "must be a whole number", "int_parsing": "must be a whole number",
             "bool_parsing": "must be true or false", "float_parsing": "must be a number",
             "greater_than_equal": f"must be at least {_limit_text(error, 'ge')}",
             "less_than_equal": f"must be at most {_limit_text(error, 'le')}",
             "literal_error": error.get("msg", "").replace("Input should be", "must be"),
             "string_too_long": f"has at most {_limit_text(error, 'max_length')} characters",
             "extra_forbidden": "is not a field of this request",
             "is_instance_of": "must be a file (a part of a multipart/form-data body)",
             "too_long": f"has at most {_limit_text(error, 'max_length')} items",
             "string_pattern_mismatch": f"must be {PATIENT_REF_RULE}" if field == "patient_ref"
             else "has the wrong form"}
    return field or "body", kinds.get(error["type"], error.get("msg", "is not valid").lower())


def parse(model: type[Model], body: object) -> Model:
    """``body`` (a JSON object, or a request's query parameters as a dict) as ``model``, or InputRejected naming the
    first field that is wrong."""
    if not isinstance(body, dict):
        names = ", ".join(model.model_fields)
        raise InputRejected("body", f"send a JSON object with {names}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        field, problem = _problem(exc.errors(include_url=False)[0])
        raise InputRejected(field, problem) from None

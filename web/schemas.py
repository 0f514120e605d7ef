"""The API's request bodies as strict pydantic models: a JSON boolean is a boolean, a number a number.

``"consent": "no"`` is not a truthy string but a 400 that names the field; so is a number sent as
text, a string longer than its column, or a value outside its range. Views call :func:`parse` and
get a model, or an :class:`web.inputs.InputRejected` that the app answers with 400.
"""
from __future__ import annotations

from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, WithJsonSchema
from werkzeug.datastructures import FileStorage

from shared.services.diagnoses import DIAGNOSIS_KINDS, GENE_MAX, VARIANT_MAX
from web.inputs import InputRejected

SEXES = ("female", "male", "other", "unknown")
PATIENT_REF_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
PATIENT_REF_RULE = "1-64 letters, digits, '.', '_' or '-' (a pseudonymous ID, no names)"
ANCESTRY_MAX = 64
AGE_MAX = 120

Model = TypeVar("Model", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, str_strip_whitespace=True, extra="forbid")


class NewCase(_Strict):
    patient_ref: Annotated[str, StringConstraints(pattern=PATIENT_REF_PATTERN)]
    sex: Literal[SEXES] = "unknown"  # type: ignore[valid-type]
    age_years: Annotated[float, Field(ge=0, le=AGE_MAX)] | None = None
    ancestry: Annotated[str, StringConstraints(max_length=ANCESTRY_MAX)] | None = None
    hpo_terms: Annotated[list[Annotated[str, StringConstraints(max_length=64)]], Field(max_length=200)] = []


class CaseUpdate(_Strict):
    """Fields left out keep their stored value; ``null`` clears an optional one."""

    patient_ref: Annotated[str, StringConstraints(pattern=PATIENT_REF_PATTERN)] | None = None
    sex: Literal[SEXES] | None = None  # type: ignore[valid-type]
    age_years: Annotated[float, Field(ge=0, le=AGE_MAX)] | None = None
    ancestry: Annotated[str, StringConstraints(max_length=ANCESTRY_MAX)] | None = None
    hpo_terms: Annotated[list[Annotated[str, StringConstraints(max_length=64)]], Field(max_length=200)] | None = None


SyndromeRef = Annotated[str, StringConstraints(min_length=1, max_length=300)] | Annotated[int, Field(ge=1)]


class DiagnosisUpdate(_Strict):
    """Fields left out keep their stored value; ``consent: false`` withdraws consent (audited)."""

    syndrome: SyndromeRef | None = None
    kind: Literal[DIAGNOSIS_KINDS] | None = None  # type: ignore[valid-type]
    gene: Annotated[str, StringConstraints(max_length=GENE_MAX)] | None = None
    variant: Annotated[str, StringConstraints(max_length=VARIANT_MAX)] | None = None
    consent: bool | None = None


# A file part of a multipart body: checked as an upload, described as binary.
Upload = Annotated[FileStorage, WithJsonSchema({"type": "string", "format": "binary"})]


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
    kinds = {"bool_type": "must be true or false (a JSON boolean)", "missing": "is required",
             "string_type": "must be text", "list_type": "must be a list",
             "float_type": "must be a number", "int_type": "must be a whole number",
             "int_from_float": "must be a whole number",
             "literal_error": error.get("msg", "").replace("Input should be", "must be"),
             "string_too_long": f"has at most {error.get('ctx', {}).get('max_length')} characters",
             "extra_forbidden": "is not a field of this request",
             "is_instance_of": "must be a file (a part of a multipart/form-data body)",
             "too_long": f"has at most {error.get('ctx', {}).get('max_length')} items",
             "string_pattern_mismatch": f"must be {PATIENT_REF_RULE}" if field == "patient_ref"
             else "has the wrong form"}
    return field or "body", kinds.get(error["type"], error.get("msg", "is not valid").lower())


def parse(model: type[Model], body: object) -> Model:
    """``body`` as ``model``, or InputRejected naming the first field that is wrong."""
    if not isinstance(body, dict):
        names = ", ".join(model.model_fields)
        raise InputRejected("body", f"send a JSON object with {names}")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        field, problem = _problem(exc.errors(include_url=False)[0])
        raise InputRejected(field, problem) from None

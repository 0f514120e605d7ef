"""What the API answers, as pydantic models: the API's document (:mod:`web.openapi`) describes its responses with them.

The views build their answers as dicts (:mod:`web.results` for a case, the catalogue and the services for the rest);
these models say what those dicts hold, field by field, and forbid anything else: the tests validate real
answers against the document, so a key a view adds without adding it here fails them.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.models import ImageStatus
from shared.services.diagnoses import DIAGNOSIS_KINDS
from web.schemas import SEXES


class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Error(_Out):
    """What went wrong, in words a person can act on; a field's problem starts with the field's name."""

    error: str


class ModelRef(_Out):
    id: int
    name: str


class ImageState(_Out):
    id: int
    status: ImageStatus


class ImagesAccepted(_Out):
    """The photos stored and queued for the pipeline."""

    images: list[ImageState]


class CaseSummary(_Out):
    id: int
    patient_ref: str
    sex: Literal[SEXES]  # type: ignore[valid-type]
    age_years: float | None
    created_at: datetime
    photos: int = Field(description="Photos uploaded to the case")


class CaseList(_Out):
    """The caller's cases (every case for an administrator), newest first, at most 500."""

    cases: list[CaseSummary]


class HpoLabel(_Out):
    id: str
    name: str = Field(description="Empty for an ID the loaded ontology does not know")


class HpoMatch(_Out):
    id: str
    name: str
    synonyms: list[str] = Field(description="Up to 5")
    label: str = Field(description="What the autocomplete shows and a case form accepts")


class HpoMatches(_Out):
    """Matching terms, best first."""

    terms: list[HpoMatch]


class CatalogueSyndrome(_Out):
    id: int
    name: str
    omim: str | None
    orpha: str | None
    genes: list[str]


class SyndromeMatch(CatalogueSyndrome):
    source: str = Field(description="The catalogue the entry came from")
    label: str = Field(description="The name with its OMIM or Orphanet ID, as the diagnosis form accepts it")


class SyndromeMatches(_Out):
    """Matching syndromes with their genes, best first."""

    syndromes: list[SyndromeMatch]


class RankedSyndrome(_Out):
    rank: int
    syndrome_id: int
    name: str
    score: float = Field(description="The gestalt score: relative similarity among the model's syndromes, "
                                     "not a probability of disease")
    omim: str | None
    orpha: str | None
    genes: list[str]


class OutOfDistribution(_Out):
    """How unlike the model's training photos (or the gallery's patients) the photo is: the mean cosine distance of
    its encoder descriptor to its nearest neighbours among them."""

    distance: float
    percentile: float = Field(description="Of the distance among held-out training photos")
    unusual: bool


class ImageResult(_Out):
    model_version: ModelRef
    outdated: bool = Field(description="Scored by a model other than the active one (re-score to update)")
    ranking: list[RankedSyndrome] = Field(description="The top 30, best first")
    regions: dict[str, dict[str, float]] = Field(description="Per member (a facial region, or identity for the "
                                                             "whole face), each ranked syndrome's score by its id")
    weights: dict[str, float] = Field(description="Each member's share of the aggregate score; 0: scored and shown, "
                                                  "but deciding nothing")
    ood: OutOfDistribution | None = Field(description="None for a model without descriptors of its training photos")


class Face(_Out):
    aligned_url: str = Field(description="The aligned face (PNG), on the portal")
    size: int = Field(description="The aligned face's side in pixels: landmarks and regions are in its coordinates")
    regions: dict[str, tuple[int, int, int, int]] = Field(description="Region boxes: x0, y0, x1, y1")
    landmarks: list[tuple[float, float]] = Field(description="The 68 landmarks (x, y) on the aligned face")
    faces_found: int
    rotation: float = Field(description="Degrees the photo was turned to find an upright face")
    measurements: dict[str, float] | None
    quality: dict[str, float | list[str]] | None = Field(description="The figures the quality gate checked (head "
                                                                     "pose in degrees among them) and its flags")
    flags: list[str] = Field(description="Why the face was scored but is less reliable, in words (e.g. 'turned "
                                         "face: less reliable')")
    detector: str
    landmarker: str | None


class ImagePayload(_Out):
    """One photo: its state in the pipeline, its face and its latest result."""

    id: int
    status: ImageStatus
    reason: str | None = Field(description="Why the photo was rejected or failed")
    width: int
    height: int
    uploaded_at: datetime
    updated_at: datetime
    result: ImageResult | None
    face: Face | None


class GalleryOnly(_Out):
    """A ranking by the gallery model: no model has been trained yet, so the syndromes are ranked by the
    similarity of their nearest diagnosed patient."""

    patients: int = Field(description="Diagnosed patients in the gallery")
    syndromes: int = Field(description="Syndromes they have")


class CaseResult(_Out):
    """The case-level ranking: the mean of its finished photos' scores by one model (the active one if it scored)."""

    model_version: ModelRef
    photos: int = Field(description="Finished photos the model scored: the ranking is the mean of their scores")
    image_ids: list[int] = Field(description="Those photos")
    left_out: int = Field(description="Finished photos with a result from another model only, not in the ranking")
    ranking: list[RankedSyndrome]
    gallery_only: GalleryOnly | None = Field(None, description="Present when the gallery model ranked the case")


class DiagnosisRecord(_Out):
    """The confirmed diagnosis as stored."""

    syndrome: CatalogueSyndrome
    kind: Literal[DIAGNOSIS_KINDS]  # type: ignore[valid-type]
    gene: str | None
    variant: str | None
    consent: bool
    recorded_at: datetime


class GalleryPatient(_Out):
    """A similar diagnosed patient who consented: a diagnosis and a similarity, no photo and no patient ID."""

    syndrome_id: int
    similarity: float
    name: str
    omim: str | None
    orpha: str | None
    genes: list[str]
    own: bool = Field(description="One of the caller's own cases")
    case_url: str | None = Field(None, description="The case's page: only for the caller's own cases (any case for "
                                                   "an administrator)")


class GallerySyndrome(_Out):
    syndrome_id: int
    similarity: float = Field(description="Of the nearest patient with the syndrome")
    patients: int
    name: str
    omim: str | None
    orpha: str | None
    genes: list[str]


class Gallery(_Out):
    """Similar diagnosed patients, and syndromes ranked by their nearest patients."""

    model_version: ModelRef
    photos: int
    gallery_patients: int
    patients: list[GalleryPatient]
    syndromes: list[GallerySyndrome]
    gallery_syndromes: int = Field(description="Syndromes among the gallery's patients")
    withheld: int = Field(description="Other clinicians' patients left out as the case's own person")
    ood: OutOfDistribution | None = Field(description="How unlike the gallery's patients the case's photos are "
                                                      "(None with too few patients)")


class Validation(_Out):
    top1: float | None
    topk: float | None
    k: int
    n: int | None
    subjects: int | None
    source: str


class DisplayModel(_Out):
    name: str
    classes: int
    validation: Validation | None


class Display(_Out):
    """What a person reads instead of internal names, and how the ranking's model was validated."""

    regions: dict[str, str]
    statuses: dict[str, str]
    status_hints: dict[str, str]
    disclaimer: str
    model: DisplayModel | None


class PhenotypeMatch(_Out):
    rank: int
    code: str = Field(description="OMIM or Orphanet ID")
    name: str
    similarity: float
    p_value: float


class JointMatch(_Out):
    rank: int
    code: str
    name: str
    probability: float
    score: float
    phenotype_part: float
    face_part: float
    facial_model: bool = Field(description="The facial model has a class for the syndrome")
    face_source: Literal["facial_model", "gallery"] | None
    face_probability: float | None
    gallery_similarity: float | None
    similarity: float


class Phenotype(_Out):
    """The phenotype ranking of the case's HPO terms over the catalogue, and the joint ranking with the face."""

    terms: int
    ignored: list[str] = Field(description="Terms outside the phenotypic abnormality subtree")
    mapped: dict[str, str] = Field(description="Alternative or obsolete IDs and the IDs they were read as")
    phenotype: list[PhenotypeMatch]
    joint: list[JointMatch] | None = Field(description="None without an installed combination")
    facial_model: str | None
    facial_photos: int = Field(description="Photos behind the facial ranking the joint ranking used")
    facial_classes: int
    gallery_syndromes: int
    combiner: dict[str, Any] | None = Field(description="How the installed combination was fitted")
    combiner_error: str | None = Field(description="Why no combination is installed or it could not be read")


class PhenotypeUnavailable(_Out):
    error: str = Field(description="Why there is no phenotype ranking now (the index still loading, say)")


class CasePayload(_Out):
    """A case with its photos, statuses and results."""

    id: int
    patient_ref: str
    sex: Literal[SEXES]  # type: ignore[valid-type]
    age_years: float | None
    ancestry: str | None
    hpo_terms: list[HpoLabel]
    created_at: datetime
    active_model: ModelRef | None
    images: list[ImagePayload]
    case_result: CaseResult | None
    diagnosis: DiagnosisRecord | None
    gallery: Gallery | None
    display: Display
    phenotype: Phenotype | PhenotypeUnavailable | None = Field(description="None for a case without HPO terms")


class AlignedUrl(_Out):
    """A presigned URL of the aligned face."""

    url: str
    expires_in: int = Field(description="Seconds the URL stays valid")


class Phenopacket(BaseModel):
    """The case as a GA4GH Phenopacket v2 (https://phenopacket-schema.readthedocs.io), in its JSON form: the
    subject, HPO terms, diagnosis, measurements and photo hashes. Empty lists are left out."""

    model_config = ConfigDict(extra="allow")

    id: str
    subject: dict[str, Any]
    phenotypicFeatures: list[dict[str, Any]] = []
    measurements: list[dict[str, Any]] = []
    files: list[dict[str, Any]] = []
    interpretations: list[dict[str, Any]] = []
    metaData: dict[str, Any]


class OpenApiDocument(BaseModel):
    """This document (OpenAPI 3.1)."""

    model_config = ConfigDict(extra="allow")

    openapi: str
    info: dict[str, Any]
    paths: dict[str, Any]

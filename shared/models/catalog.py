from __future__ import annotations

from sqlalchemy import CheckConstraint, String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base
from shared.models._types import JSONB


class Syndrome(Base):
    """A disorder a model can rank or a clinician can diagnose.

    ``name`` is the label used by training folders and manifests. Catalogue entries come from
    the HPO annotation data (``gestalt catalog load``) and carry their OMIM or Orphanet ID
    (``OMIM:122470``, ``ORPHA:2322``); ``local`` rows are labels created by training only.
    """

    __tablename__ = "syndromes"
    __table_args__ = (CheckConstraint("source in ('local', 'omim', 'orpha')", name="source"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    omim: Mapped[str | None] = mapped_column(String(32), unique=True)  # "OMIM:122470"
    orpha: Mapped[str | None] = mapped_column(String(32), unique=True)  # "ORPHA:2322"
    source: Mapped[str] = mapped_column(String(16), default="local", server_default="local")
    genes: Mapped[list] = mapped_column(JSONB, default=list)  # HGNC symbols, sorted


class HpoTerm(Base):
    """A term of the Human Phenotype Ontology, for the case form's autocomplete and validation."""

    __tablename__ = "hpo_terms"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)  # "HP:0000316"
    name: Mapped[str] = mapped_column(String(255))
    synonyms: Mapped[list] = mapped_column(JSONB, default=list)

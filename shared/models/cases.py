from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import (
    Boolean,
    CheckConstraint,
    Float,
    ForeignKey,
    Integer,
    String,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from shared.db import Base
from shared.models._types import JSONB, created_at_column, updated_at_column


class ImageStatus(enum.StrEnum):
    """A photo's status; the moves between them, and the events that cause them, are ``shared.photos.TRANSITIONS``."""

    queued = "queued"
    detecting = "detecting"
    aligning = "aligning"
    scoring = "scoring"
    done = "done"
    rejected = "rejected"  # permanent: no usable face, an unreadable image, or cancelled; `reason` says why
    awaiting_model = "awaiting_model"  # preprocessed, no active model yet
    failed = "failed"  # retries exhausted, or the sweep gave up; only a retry (an admin's) or a rescore moves it on


ACTIVE_STATES = ("queued", "detecting", "aligning", "scoring")


class Case(Base):
    __tablename__ = "cases"
    __table_args__ = (CheckConstraint("sex in ('female', 'male', 'other', 'unknown')", name="sex"),
                      UniqueConstraint("owner_id", "external_id"))

    id: Mapped[int] = mapped_column(primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="RESTRICT"), index=True)
    # The id of the Phenopacket the case was imported from: importing it again creates nothing new.
    external_id: Mapped[str | None] = mapped_column(String(128))
    # Pseudonymous patient ID chosen by the clinic; never a name.
    patient_ref: Mapped[str] = mapped_column(String(64))
    sex: Mapped[str] = mapped_column(String(8), default="unknown")
    age_years: Mapped[float | None] = mapped_column(Float)
    # Self-reported ancestry, free text (optional); never a name or a place of residence.
    ancestry: Mapped[str | None] = mapped_column(String(64))
    # Validated HPO term IDs ("HP:0000316"), in the order the clinician entered them.
    hpo_terms: Mapped[list] = mapped_column(JSONB, default=list, server_default=text("'[]'::jsonb"))
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()

    images: Mapped[list[Image]] = relationship(
        back_populates="case", cascade="all, delete-orphan", passive_deletes=True, order_by="Image.id")
    diagnosis: Mapped[Diagnosis | None] = relationship(
        back_populates="case", cascade="all, delete-orphan", passive_deletes=True, uselist=False)


class Image(Base):
    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), index=True)
    # sha256 of the stored, EXIF-free bytes; the object key derives from it.
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    object_key: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(64))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default=ImageStatus.queued.value, index=True)
    reason: Mapped[str | None] = mapped_column(String(500))
    # Monotonic timestamps of each stage (epoch seconds), for per-stage latency.
    stage_times: Mapped[dict] = mapped_column(JSONB, default=dict)
    created_at: Mapped[datetime] = created_at_column()
    updated_at: Mapped[datetime] = updated_at_column()

    case: Mapped[Case] = relationship(back_populates="images")
    face: Mapped[Face | None] = relationship(
        back_populates="image", cascade="all, delete-orphan", passive_deletes=True, uselist=False)


class Face(Base):
    """The main face chosen in an image, with its landmarks and alignment."""

    __tablename__ = "faces"

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), unique=True)
    box: Mapped[list] = mapped_column(JSONB)  # [x0, y0, x1, y1] in the photo turned by ``rotation``
    confidence: Mapped[float] = mapped_column(Float)
    faces_found: Mapped[int] = mapped_column(Integer, default=1)
    detector: Mapped[str] = mapped_column(String(64))
    landmarker: Mapped[str | None] = mapped_column(String(64))
    # sha256 of the weight files behind ``detector`` and ``landmarker``: {"detector": ..., "landmarker": ...}
    weights: Mapped[dict] = mapped_column(JSONB, default=dict, server_default=text("'{}'::jsonb"))
    # Degrees the photo was turned (counter-clockwise) for ``box``: 0 for an upright face.
    rotation: Mapped[float] = mapped_column(Float, default=0.0, server_default=text("0"))
    landmarks: Mapped[list | None] = mapped_column(JSONB)  # 68 x [x, y] in image pixels
    transform: Mapped[list | None] = mapped_column(JSONB)  # 2x3 image -> aligned canvas
    # The quality gate's figures (shared.ml.preprocess.quality) and facial measurements
    # (shared.ml.preprocess.measurements).
    quality: Mapped[dict | None] = mapped_column(JSONB)
    measurements: Mapped[dict | None] = mapped_column(JSONB)
    aligned_key: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = created_at_column()

    image: Mapped[Image] = relationship(back_populates="face")
    crops: Mapped[list[Crop]] = relationship(
        back_populates="face", cascade="all, delete-orphan", passive_deletes=True, order_by="Crop.region")


class Crop(Base):
    __tablename__ = "crops"
    __table_args__ = (UniqueConstraint("face_id", "region"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    face_id: Mapped[int] = mapped_column(ForeignKey("faces.id", ondelete="CASCADE"), index=True)
    region: Mapped[str] = mapped_column(String(32))
    object_key: Mapped[str] = mapped_column(String(255))

    face: Mapped[Face] = relationship(back_populates="crops")


class RegionScore(Base):
    """One region's softmax over the model's classes, for one image and model version."""

    __tablename__ = "region_scores"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id", "region"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    region: Mapped[str] = mapped_column(String(32))
    scores: Mapped[list] = mapped_column(JSONB)  # probabilities in the model's class order
    created_at: Mapped[datetime] = created_at_column()


class Result(Base):
    """The aggregate (the members' softmaxes combined) and its ranking, stamped with the model version."""

    __tablename__ = "results"
    __table_args__ = (UniqueConstraint("image_id", "model_version_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id", ondelete="CASCADE"))
    scores: Mapped[list] = mapped_column(JSONB)
    # [{"syndrome_id", "name", "score", "rank"}, ...] best first, all classes
    ranking: Mapped[list] = mapped_column(JSONB)
    # The identity member's out-of-distribution score: {"distance", "percentile", "unusual"}
    # (shared.ml.members.identity.OODReference); None for a model without that member.
    ood: Mapped[dict | None] = mapped_column(JSONB, nullable=True)
    created_at: Mapped[datetime] = created_at_column()


class Diagnosis(Base):
    """The confirmed diagnosis of a case; with consent it feeds retraining."""

    __tablename__ = "diagnoses"
    __table_args__ = (CheckConstraint("kind in ('clinical', 'molecular')", name="kind"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    case_id: Mapped[int] = mapped_column(ForeignKey("cases.id", ondelete="CASCADE"), unique=True)
    syndrome_id: Mapped[int] = mapped_column(ForeignKey("syndromes.id", ondelete="RESTRICT"))
    kind: Mapped[str] = mapped_column(String(16))
    gene: Mapped[str | None] = mapped_column(String(32))
    variant: Mapped[str | None] = mapped_column(String(255))
    consent: Mapped[bool] = mapped_column(Boolean, default=False)
    diagnosed_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = created_at_column()

    case: Mapped[Case] = relationship(back_populates="diagnosis")

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, ForeignKey, Index, LargeBinary, String, UniqueConstraint, text
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base
from shared.models._types import JSONB, created_at_column


class ModelStatus(enum.StrEnum):
    candidate = "candidate"
    active = "active"
    retired = "retired"
    rejected = "rejected"


class ModelVersion(Base):
    """A trained regional ensemble. The checkpoint lives in the object store."""

    __tablename__ = "model_versions"
    __table_args__ = (
        CheckConstraint("status in ('candidate', 'active', 'retired', 'rejected')", name="status"),
        # At most one active model at any time.
        Index("uq_model_versions_one_active", "status", unique=True,
              postgresql_where=text("status = 'active'")),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    arch: Mapped[str] = mapped_column(String(64))
    config: Mapped[dict] = mapped_column(JSONB, default=dict)
    # [{"syndrome_id": int, "name": str}, ...] in output order
    classes: Mapped[list] = mapped_column(JSONB, default=list)
    checkpoint_key: Mapped[str] = mapped_column(String(255))
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict] = mapped_column(JSONB, default=dict)
    status: Mapped[str] = mapped_column(String(16), default=ModelStatus.candidate.value)
    created_at: Mapped[datetime] = created_at_column()
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class ImageFeature(Base):
    """Pooled backbone features of one region of one image, cached per backbone version.

    Written when the image is scored; the nightly head retraining reads them instead
    of running the CNN again.
    """

    __tablename__ = "image_features"
    __table_args__ = (UniqueConstraint("image_id", "region", "backbone_sha"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id", ondelete="CASCADE"), index=True)
    region: Mapped[str] = mapped_column(String(32))
    backbone_sha: Mapped[str] = mapped_column(String(64), index=True)
    vector: Mapped[bytes] = mapped_column(LargeBinary)  # float32, little-endian
    created_at: Mapped[datetime] = created_at_column()


class TrainingRun(Base):
    """One retraining run: what it trained on, both models' holdout metrics, and the decision."""

    __tablename__ = "training_runs"
    __table_args__ = (
        CheckConstraint("status in ('running', 'promoted', 'rejected', 'failed', 'skipped', 'dry_run')",
                        name="status"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default="heads")  # heads | full
    trigger: Mapped[str] = mapped_column(String(16))  # beat | cli | admin
    status: Mapped[str] = mapped_column(String(16), default="running")
    base_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    candidate_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id", ondelete="SET NULL"))
    counts: Mapped[dict] = mapped_column(JSONB, default=dict)
    durations: Mapped[dict] = mapped_column(JSONB, default=dict)
    metrics: Mapped[dict] = mapped_column(JSONB, default=dict)
    decision: Mapped[str | None] = mapped_column(String(1000))
    host: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime] = created_at_column()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import CheckConstraint, DateTime, Index, String, text
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

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from shared.db import Base
from shared.models._types import JSONB


class Syndrome(Base):
    """A disorder a model can rank. ``name`` is the label used by training folders and manifests."""

    __tablename__ = "syndromes"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    omim: Mapped[str | None] = mapped_column(String(32))
    genes: Mapped[list] = mapped_column(JSONB, default=list)

"""Looking up model versions (no torch: the portal's pages ask which version is active)."""
from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import ModelStatus, ModelVersion


class ModelNotFound(LookupError):
    pass


def find_version(session: Session, ref: str | int) -> ModelVersion:
    """A version by name, or by numeric id."""
    ref = str(ref)
    condition = ModelVersion.name == ref
    if ref.isascii() and ref.isdigit():  # str.isdigit also accepts "¹" and other non-ASCII digits
        condition = condition | (ModelVersion.id == int(ref))
    version = session.scalars(select(ModelVersion).where(condition)).first()
    if version is None:
        raise ModelNotFound(f"no model version {ref!r}")
    return version


def active_version(session: Session) -> ModelVersion | None:
    return session.scalars(select(ModelVersion).where(ModelVersion.status == ModelStatus.active.value)).first()


def is_gallery(version: ModelVersion | None) -> bool:
    """Whether ``version`` is a model with no trained member: it ranks by the gallery of diagnosed patients alone
    (``shared.modelops.registry.ensure_gallery_model``)."""
    return version is not None and (version.config or {}).get("backbone") == "none"

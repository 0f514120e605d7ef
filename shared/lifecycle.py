"""Deleting patient data: one case on request, old cases by the retention rule, and orphaned objects."""
from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.audit import audit
from shared.models import Case, Crop, Face, Image
from shared.storage import Storage, aligned_key, crops_prefix

logger = logging.getLogger(__name__)

# Prefixes of objects that belong to images (models/ are never collected).
IMAGE_PREFIXES = ("originals/", "crops/", "aligned/")


def delete_case(session: Session, storage: Storage, case: Case, actor_id: int | None, reason: str,
                ip: str | None = None) -> int:
    """Delete a case with its images and derived rows, then its objects no other image uses.

    The rows go first (one transaction, audited); objects that fail to delete are
    left to :func:`collect_orphans`. Returns the number of objects removed.
    """
    images = list(session.scalars(select(Image).where(Image.case_id == case.id)))
    keys = {i.object_key for i in images} | {aligned_key(i.sha256) for i in images}
    keys |= set(session.scalars(select(Crop.object_key).join(Face).where(Face.image_id.in_([i.id for i in images]))))
    hashes = {i.sha256 for i in images}
    audit(session, "case_delete", actor_id, "case", case.id, ip=ip, reason=reason, images=len(images))
    session.delete(case)
    session.commit()
    still_used = set(session.scalars(select(Image.sha256).where(Image.sha256.in_(hashes))))
    for sha in hashes - still_used:  # crops no row points at any more, and the heatmaps made on demand
        try:
            keys |= set(storage.list(crops_prefix(sha)))
        except Exception:  # noqa: BLE001 - the orphan collector removes them later
            logger.warning("photo=%s state=crops_list_failed", sha)
    removed = 0
    for key in sorted(keys):
        if any(h in still_used for h in _hashes_in(key)):
            continue  # the same photo is in another case
        try:
            storage.delete(key)
            removed += 1
        except Exception:  # noqa: BLE001 - the orphan collector removes it later
            logger.warning("object=%s state=delete_failed", key)
    logger.info("case=%s state=deleted images=%d objects=%d", case.id, len(images), removed)
    return removed


def apply_retention(session: Session, storage: Storage, days: int, now: datetime | None = None) -> int:
    """Delete cases created more than ``days`` ago (0 keeps everything). Returns the number deleted."""
    if days <= 0:
        return 0
    cutoff = (now or datetime.now(UTC)) - timedelta(days=days)
    old = list(session.scalars(select(Case).where(Case.created_at < cutoff)))
    for case in old:
        delete_case(session, storage, case, None, f"retention: older than {days} days")
    return len(old)


def collect_orphans(session: Session, storage: Storage, min_age: timedelta = timedelta(hours=1)) -> int:
    """Remove image objects that no row refers to (older than ``min_age``, so uploads in flight are safe)."""
    referenced = set(session.scalars(select(Image.object_key)))
    hashes = set(session.scalars(select(Image.sha256)))
    cutoff = datetime.now(UTC) - min_age
    removed = 0
    for prefix in IMAGE_PREFIXES:
        for obj in storage.client.list_objects(storage.bucket, prefix=prefix, recursive=True):
            key = obj.object_name
            if key in referenced or any(h in hashes for h in _hashes_in(key)):
                continue
            if obj.last_modified and obj.last_modified > cutoff:
                continue
            storage.delete(key)
            removed += 1
    if removed:
        logger.info("orphans removed=%d", removed)
    return removed


def _hashes_in(key: str) -> list[str]:
    """The sha256 a key was built from (see shared.storage key builders)."""
    return [part.split(".")[0] for part in key.split("/") if len(part.split(".")[0]) == 64]

"""Accepting photos: validate, strip metadata, store, commit, then enqueue."""
from __future__ import annotations

import logging
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.audit import audit
from shared.config import get_settings
from shared.ml.preprocess.imaging import DecodedImage, ImageRejected, decode_upload
from shared.models import Case, Image, ImageStatus
from shared.services import Refusal
from shared.storage import get_storage, original_key

logger = logging.getLogger(__name__)


class UploadError(Refusal):
    """A photo refused (unreadable, too large, too small...): the whole upload is refused."""

    def __init__(self, filename: str, reason: str, status: int):
        super().__init__(f"{filename}: {reason}", status)
        self.filename = filename
        self.reason = reason


def receive_photos(db: Session, case: Case, files: list, user_id: int, ip: str | None) -> list[Image]:
    """The photos of one upload request (werkzeug ``FileStorage`` objects): all stored and queued, or a :class:`Refusal`
    (audited when a photo is refused)."""
    if not files or all(not f.filename for f in files):
        raise Refusal("no photo was attached", 400)
    try:
        decoded = validate_files([(f.filename or "photo", f.read()) for f in files])
    except UploadError as exc:
        audit(db, "upload_refused", user_id, "case", case.id, ip=ip, reason=exc.reason)
        db.commit()
        raise
    return store_images(db, case, decoded, user_id, ip)


def validate_files(files: list[tuple[str, bytes]]) -> list[DecodedImage]:
    """Decode every file; the first bad one raises :class:`UploadError` and nothing is kept."""
    s = get_settings()
    decoded = []
    for filename, data in files:
        try:
            decoded.append(decode_upload(data, max_bytes=s.max_upload_bytes, max_pixels=s.max_image_megapixels * 1e6,
                                         min_side=s.min_image_side, pixels=False))
        except ImageRejected as exc:
            raise UploadError(filename, exc.reason, exc.http_status) from exc
    return decoded


def store_images(db: Session, case: Case, decoded: list[DecodedImage], user_id: int, ip: str | None) -> list[Image]:
    """Put the photos in the object store and add queued rows; commit; then enqueue the pipeline.

    If the database write fails, objects that no other image uses are removed again,
    so a failed upload leaves nothing behind.
    """
    storage = get_storage()
    keys = []
    for d in decoded:
        # Content-addressed: writing a photo that is already stored writes the same bytes again, which costs
        # less than asking first for every photo (duplicates are rare).
        key = original_key(d.sha256, d.ext)
        storage.put(key, d.data, d.content_type)
        keys.append(key)
    try:
        images = [Image(case_id=case.id, sha256=d.sha256, object_key=original_key(d.sha256, d.ext),
                        content_type=d.content_type, width=d.width, height=d.height,
                        status=ImageStatus.queued.value, stage_times={"uploaded": time.time()}) for d in decoded]
        db.add_all(images)
        db.flush()
        for image in images:
            audit(db, "upload", user_id, "image", image.id, ip=ip, case_id=case.id, sha256=image.sha256)
        db.commit()
    except Exception:
        db.rollback()
        for key in keys:
            if not db.scalar(select(func.count()).select_from(Image).where(Image.object_key == key)):
                storage.delete(key)
        raise
    from shared.dispatch import enqueue_photo

    for image in images:
        try:
            enqueue_photo(image.id)
        except Exception:  # noqa: BLE001 - the row is safe; the sweeper enqueues it later
            logger.exception("image=%s state=enqueue_failed", image.id)
    return images

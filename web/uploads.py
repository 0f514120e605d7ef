"""Accepting photos: validate, strip metadata, store, commit, then enqueue.

The request does bounded work per photo and per request: the number of photos, then every photo's header
(:func:`shared.ml.preprocess.imaging.frame_size`: format, size, a JPEG's scans, a PNG's chunks) against the
megapixel budget of one request, all before any pixel is decoded; then each photo is checked and stored without its
metadata (a JPEG or plain PNG as its own compressed data, anything else decoded and encoded afresh) under a
processor-time budget for the whole request, which refuses the upload with 413 and leaves the web worker serving.
"""
from __future__ import annotations

import logging
import signal
import threading
import time

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.audit import audit
from shared.config import get_settings
from shared.ml.preprocess.imaging import DecodedImage, ImageRejected, decode_upload, frame_size
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
    (audited when the upload is refused for its photos)."""
    files = [f for f in files if f.filename]
    if not files:
        raise Refusal("no photo was attached", 400)
    limit = get_settings().max_photos_per_request
    try:
        if len(files) > limit:
            raise Refusal(f"{len(files)} photos in one upload; upload at most {limit} at a time", 413)
        decoded = validate_files([(f.filename or "photo", f.read()) for f in files])
    except Refusal as exc:
        audit(db, "upload_refused", user_id, "case", case.id, ip=ip, reason=getattr(exc, "reason", exc.message),
              photos=len(files))
        db.commit()
        raise
    return store_images(db, case, decoded, user_id, ip)


def validate_files(files: list[tuple[str, bytes]]) -> list[DecodedImage]:
    """Check every file's header against the request's megapixel budget, then check and strip each one under the
    request's processor-time budget; the first bad one raises :class:`UploadError` (a :class:`Refusal`) and
    nothing is kept."""
    s = get_settings()
    limits = {"max_pixels": s.max_image_megapixels * 1e6, "max_scans": s.max_jpeg_scans}
    total = 0
    for filename, data in files:
        try:
            width, height = frame_size(data, **limits)
        except ImageRejected as exc:
            raise UploadError(filename, exc.reason, exc.http_status) from exc
        total += width * height
    if total > s.max_request_megapixels * 1e6:
        raise Refusal(f"these {len(files)} photos hold {total / 1e6:.0f} megapixels; one upload takes at most "
                      f"{s.max_request_megapixels:.0f}: upload them in smaller groups", 413)
    decoded, budget = [], CpuBudget(s.upload_cpu_seconds)
    with budget:
        for filename, data in files:
            try:
                budget.check()
                decoded.append(decode_upload(data, max_bytes=s.max_upload_bytes, min_side=s.min_image_side,
                                             pixels=False, **limits))
            except ImageRejected as exc:
                raise UploadError(filename, exc.reason, exc.http_status) from exc
            except BudgetExceeded as exc:
                logger.warning("upload state=refused reason=cpu_budget seconds=%s file=%r", s.upload_cpu_seconds,
                               filename[:100])
                raise UploadError(filename, f"checking this upload's photos took more than {s.upload_cpu_seconds:g} "
                                            "s of processor time; upload fewer photos at a time, or save them as "
                                            "JPEG", 413) from exc
    return decoded


class BudgetExceeded(BaseException):
    """The request's processor-time budget ran out. A BaseException, so that no ``except Exception`` inside a
    decoder's Python code swallows it."""


class CpuBudget:
    """A processor-time budget for decoding one request's photos.

    In the main thread (gunicorn's sync workers serve each request there) a profiling timer interrupts a decode
    that runs past it: SIGPROF fires after ``seconds`` of the process's processor time and its handler raises
    :class:`BudgetExceeded` between two of the decoder's reads. In another thread (a threaded development
    server) signals cannot be used, and :meth:`check` enforces it between photos.
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.thread_time()
        self.armed = seconds > 0 and threading.current_thread() is threading.main_thread()
        self._previous = None

    def _expired(self, _signum, _frame) -> None:
        raise BudgetExceeded

    def check(self) -> None:
        if self.seconds > 0 and time.thread_time() - self.start > self.seconds:
            raise BudgetExceeded

    def __enter__(self) -> CpuBudget:
        if self.armed:
            self._previous = signal.signal(signal.SIGPROF, self._expired)
            signal.setitimer(signal.ITIMER_PROF, self.seconds)
        return self

    def __exit__(self, *exc) -> None:
        if self.armed:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, self._previous)


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

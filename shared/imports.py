"""Creating cases from what a clinic already has: the half that every import shares.

An import reads and checks its whole source first (:mod:`shared.phenopackets` a folder of Phenopackets,
:mod:`shared.photo_import` a folder of photos by syndrome and patient) into :class:`PlannedCase` objects, and
refuses with every problem at once (:class:`ImportRefused`) before it writes anything. :func:`write_cases` then
stores the photos, writes every case, diagnosis and image row in one transaction and audits each case; if anything
fails on the way, the objects it stored are removed again (unless another image uses them) and nothing is left.
A planned case whose ``external_id`` its owner already has is skipped, so running an import again creates nothing
new. After the commit the caller queues the new photos for the pipeline (:func:`enqueue_images`).

A checked photo is not kept in memory (:class:`PlannedPhoto`): it is read and decoded again when it is stored, and
must give the same bytes, so an archive of thousands of photos costs one photo's memory at a time.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.audit import audit
from shared.config import get_settings
from shared.ml.preprocess.imaging import DecodedImage, ImageRejected, decode_upload
from shared.models import Case, Diagnosis, Image, ImageStatus, Syndrome
from shared.storage import Storage, original_key

logger = logging.getLogger(__name__)
UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE: here, a case (owner, external_id) written meanwhile


class ImportRefused(ValueError):
    """Nothing was imported; ``problems`` has one line per problem found."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PlannedPhoto:
    """A photo that passed the upload gate: where it is, and what its stored form will be."""

    path: Path
    label: str  # the photo's path as the person importing it knows it, for messages
    keep_clean: bool
    sha256: str
    ext: str
    content_type: str
    width: int
    height: int

    @property
    def key(self) -> str:
        return original_key(self.sha256, self.ext)


def decode_photo(path: Path, keep_clean: bool = False) -> DecodedImage:
    """The photo at ``path`` through the portal's upload gate and its bounds (file size, megapixels, a JPEG's scans,
    the smallest side), metadata stripped: :class:`shared.ml.preprocess.imaging.ImageRejected` says why not.
    Never reads more of the file than the gate accepts."""
    s = get_settings()
    with path.open("rb") as fh:
        data = fh.read(s.max_upload_bytes + 1)
    return decode_upload(data, max_bytes=s.max_upload_bytes, min_side=s.min_image_side,
                         max_pixels=s.max_image_megapixels * 1e6, max_scans=s.max_jpeg_scans, keep_clean=keep_clean,
                         pixels=False)


def check_photo(path: Path, label: str, keep_clean: bool = False) -> PlannedPhoto:
    """:func:`decode_photo`, keeping only what the photo's image row needs."""
    d = decode_photo(path, keep_clean)
    return PlannedPhoto(path=path, label=label, keep_clean=keep_clean, sha256=d.sha256, ext=d.ext,
                        content_type=d.content_type, width=d.width, height=d.height)


@dataclass
class PlannedCase:
    """A patient read and checked, ready to become a case."""

    source: str  # where it came from, for the audit log: a packet's file name, a photo folder's path
    external_id: str
    patient_ref: str
    sex: str = "unknown"
    age_years: float | None = None
    ancestry: str | None = None
    hpo_terms: list[str] = field(default_factory=list)
    syndrome: Syndrome | None = None
    kind: str = "clinical"
    gene: str | None = None
    variant: str | None = None
    consent: bool = False
    photos: list[PlannedPhoto] = field(default_factory=list)


@dataclass
class ImportResult:
    cases: list[Case]
    skipped: list[str]  # external ids the owner had before
    image_ids: list[int]


def write_cases(db: Session, storage: Storage, plans: list[PlannedCase], owner_id: int, *, via: str,
                actor_id: int | None = None, ip: str | None = None) -> ImportResult:
    """Every plan whose ``external_id`` ``owner_id`` does not have yet as a case of ``owner_id``, committed in one
    transaction with its diagnosis, its queued image rows and a ``case_import`` audit row (by ``actor_id``, else
    the owner); or an exception and nothing written (objects stored on the way are removed again)."""
    ids = [p.external_id for p in plans]
    existing = set(db.scalars(select(Case.external_id).where(Case.owner_id == owner_id, Case.external_id.in_(ids))))
    new = [p for p in plans if p.external_id not in existing]
    put: list[str] = []
    try:
        _store_photos(storage, [photo for plan in new for photo in plan.photos], put)
        cases, images = [], []
        for plan in new:
            case, rows = _add_case(db, plan, owner_id)
            images += rows
            audit(db, "case_import", actor_id or owner_id, "case", case.id, ip=ip, via=via, owner=owner_id,
                  external_id=plan.external_id, source=plan.source, photos=len(rows))
            cases.append(case)
        db.flush()
        for image in images:
            image.stage_times = {"uploaded": image.created_at.timestamp()}
        db.commit()
    except BaseException as exc:  # a processor-time budget's interrupt too: nothing may stay behind
        db.rollback()
        for key in put:
            if db.scalar(select(Image.id).where(Image.object_key == key).limit(1)) is None:
                storage.delete(key)
        if isinstance(exc, IntegrityError) and getattr(exc.orig, "sqlstate", None) == UNIQUE_VIOLATION:
            raise ImportRefused(["another import created some of these patients' cases at the same time; "
                                 "run this import again (what is there now is skipped)"]) from exc
        raise
    return ImportResult(cases=cases, skipped=sorted(existing), image_ids=[i.id for i in images])


def _store_photos(storage: Storage, photos: list[PlannedPhoto], put: list[str]) -> None:
    """Put each photo not stored yet, decoded again from its file; ``put`` collects the keys written."""
    for photo in photos:
        if photo.key in put or storage.exists(photo.key):
            continue
        try:
            decoded = decode_photo(photo.path, photo.keep_clean)
        except (OSError, ImageRejected) as exc:
            raise ImportRefused([f"{photo.label}: cannot be read any more ({exc}); run the import again"]) from exc
        if decoded.sha256 != photo.sha256:
            raise ImportRefused([f"{photo.label}: the file changed while it was being imported; "
                                 "run the import again"])
        storage.put(photo.key, decoded.data, decoded.content_type)
        put.append(photo.key)


def _add_case(db: Session, plan: PlannedCase, owner_id: int) -> tuple[Case, list[Image]]:
    case = Case(owner_id=owner_id, external_id=plan.external_id, patient_ref=plan.patient_ref, sex=plan.sex,
                age_years=plan.age_years, ancestry=plan.ancestry, hpo_terms=plan.hpo_terms)
    db.add(case)
    db.flush()
    if plan.syndrome is not None:
        case.diagnosis = Diagnosis(case_id=case.id, syndrome_id=plan.syndrome.id, kind=plan.kind, gene=plan.gene,
                                   variant=plan.variant, consent=plan.consent, diagnosed_by=owner_id)
    rows = [Image(case_id=case.id, sha256=photo.sha256, object_key=photo.key, content_type=photo.content_type,
                  width=photo.width, height=photo.height, status=ImageStatus.queued.value, stage_times={})
            for photo in plan.photos]
    db.add_all(rows)
    return case, rows


def enqueue_images(image_ids: list[int]) -> list[int]:
    """Start the pipeline of each committed image; returns the ids the broker did not take (the sweeper queues
    them later, as it does any photo left ``queued``)."""
    from shared.dispatch import enqueue_photo

    missed = []
    for image_id in image_ids:
        try:
            enqueue_photo(image_id)
        except Exception:  # noqa: BLE001 - the row is committed; the sweeper queues it later
            logger.warning("image=%s state=enqueue_failed (the sweeper queues it)", image_id)
            missed.append(image_id)
    return missed

"""Alignment of a batch: landmarks in one pass, the quality gate, each face's crops stored as one object,
faces updated in one transaction."""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from sqlalchemy import Integer, String, bindparam, column, func, select, update
from sqlalchemy.dialects.postgresql import JSONB

from shared import photos
from shared.db import session_scope, upsert_rows
from shared.ml.preprocess.detection import DetectedFace
from shared.ml.preprocess.imaging import ImageRejected
from shared.ml.preprocess.pipeline import Detection
from shared.modelops.crops import aligned_digest, face_crops, store_crops
from shared.models import Crop, Face, Image, ImageStatus
from shared.storage import aligned_png_key, get_storage
from worker.stages import resources
from worker.stages.claims import CLAIM_AT, locked, reject_in

logger = logging.getLogger("worker.pipeline")  # the pipeline's log lines keep one name, whichever step writes them
# A batch's crop rows (a row per face and crop, all naming the face's one object): one statement.
_CROPS = upsert_rows(Crop, ["face_id", "region"], ["object_key"])
# A batch's faces, aligned: one UPDATE ... FROM the rows as one JSON array (not a load of each face and an
# UPDATE per face); the landmark model's hash joins the face's ``weights``.
_FACES = Face.__table__
_R = func.jsonb_to_recordset(bindparam("rows", type_=JSONB)).table_valued(
    column("image_id", Integer), column("landmarks", JSONB), column("transform", JSONB),
    column("aligned_key", String), column("landmarker", String), column("landmarker_sha", String),
    column("quality", JSONB), column("measurements", JSONB)).render_derived(name="r", with_types=True)
_ALIGNED = (update(_FACES).where(_FACES.c.image_id == _R.c.image_id)
            .values(landmarks=_R.c.landmarks, transform=_R.c.transform, aligned_key=_R.c.aligned_key,
                    landmarker=_R.c.landmarker, quality=_R.c.quality, measurements=_R.c.measurements,
                    weights=func.coalesce(_FACES.c.weights, func.jsonb_build_object())
                    .op("||")(func.jsonb_build_object("landmarker", _R.c.landmarker_sha)))
            .returning(_FACES.c.image_id, _FACES.c.id))


def _store_images(items: list[tuple[Image, np.ndarray, Any]], results: list) -> dict[int, tuple[str, str]]:
    """Each aligned photo's crops (every region, the identity chip and the aligned face: one object), stored in
    parallel; by photo id, that object's key and the key of the aligned face's PNG, which the portal makes from
    the crops object when the face is first shown (:func:`shared.modelops.crops.aligned_face_png`)."""
    puts = {}
    for (image, _, _), aligned in zip(items, results, strict=True):
        if isinstance(aligned, ImageRejected):
            continue
        png_key = aligned_png_key(image.sha256, aligned_digest(aligned.aligned_rgb))
        puts[image.id] = (png_key, resources.io_pool().submit(
            store_crops, get_storage(), image.sha256, face_crops(aligned), aligned.aligned_rgb))
    return {i: (crops.result(), png_key) for i, (png_key, crops) in puts.items()}


def _alignment_row(image_id: int, aligned: Any, aligned_object: str, pre: Any) -> dict:
    return {"image_id": image_id, "landmarks": np.round(aligned.landmarks, 2).tolist(),
            "transform": aligned.alignment.matrix.tolist(), "aligned_key": aligned_object,
            "landmarker": pre.landmarker_name, "landmarker_sha": pre.provenance["landmarker_sha256"],
            "quality": aligned.quality, "measurements": aligned.measurements}


def _record_alignments(session: Any, rows: list[dict]) -> dict[int, int]:
    """Each face's landmarks, alignment, quality and measurements (and its landmark model in ``weights``), one
    statement for the batch; by photo id, the id of each face updated (a face detection's output no longer has
    is missing)."""
    if not rows:
        return {}
    return dict(session.execute(_ALIGNED, {"rows": rows}).all())


def _on_to_scoring(row: Image, fused: bool, now: float) -> None:
    if fused:  # stamped as started: no infer batch of another worker claims it meanwhile
        photos.move(row, ImageStatus.scoring, photos.Event.align, align_end=now, infer_start=now,
                    infer_by=resources.node(), **{CLAIM_AT: now})
    else:  # waiting for scoring, claimable by any infer batch
        photos.aligned(row, align_end=now, **{CLAIM_AT: None})


def align_batch(items: list[tuple[Image, np.ndarray, Any]], fused: bool = True) -> list[tuple[Image, Any]]:
    """Landmarks for the whole batch in one pass, the quality gate, crops; stored in one transaction.

    Returns (photo, aligned face) of the photos that go on to scoring, their crops in memory.
    """
    if not items:
        return []
    results = resources.preprocessor().align_batch(
        [rgb for _, rgb, _ in items], [d.face.box for _, _, d in items], [d.rotation for _, _, d in items])
    keys = _store_images(items, results)
    pre = resources.preprocessor()
    now = time.time()
    out = []
    with session_scope() as session:
        rows = locked(session, [image.id for image, _, _ in items], ImageStatus.aligning, "align")
        faces = _record_alignments(session, [
            _alignment_row(image.id, aligned, keys[image.id][1], pre)
            for (image, _, _), aligned in zip(items, results, strict=True)
            if image.id in rows and not isinstance(aligned, ImageRejected)])
        crop_rows = []
        for (image, _, _), aligned in zip(items, results, strict=True):
            row = rows.get(image.id)
            if row is None:
                continue
            if isinstance(aligned, ImageRejected):
                reject_in(row, aligned.reason, now)
                continue
            face_id = faces.get(image.id)
            if face_id is None:  # detection's output vanished meanwhile: the photo's own message starts over
                photos.stamp(row, **{CLAIM_AT: None})
                continue
            crop_rows += [{"face_id": face_id, "region": name, "object_key": keys[image.id][0]}
                          for name in face_crops(aligned)]
            _on_to_scoring(row, fused, now)
            out.append((image, aligned))
        if crop_rows:
            session.execute(_CROPS, {"rows": crop_rows})
    if len(rows) < len(items):
        _forget_deleted(items, keys)
    return out


def _forget_deleted(items: list[tuple[Image, np.ndarray, Any]], keys: dict[int, tuple[str, str]]) -> None:
    """The objects this batch stored for photos deleted meanwhile (their case was deleted while the batch ran):
    removed again, unless a photo with the same original still exists (the deletion may have listed the
    photo's objects before this batch stored them)."""
    shas = {image.sha256: image.id for image, _, _ in items if image.id in keys}
    with session_scope() as session:
        live = set(session.scalars(select(Image.sha256).where(Image.sha256.in_(list(shas)))))
    for sha, image_id in shas.items():
        if sha in live:
            continue
        try:
            for key in keys[image_id]:
                get_storage().delete(key)
            logger.info("image=%s state=deleted_meanwhile objects=%d", image_id, len(keys[image_id]))
        except Exception:  # noqa: BLE001 - the orphan collector removes them later
            logger.warning("image=%s state=deleted_meanwhile objects=left_to_orphan_collector", image_id)


def stored_detections(batch: list[Image]) -> tuple[list[tuple[Image, np.ndarray, Any]], list[int]]:
    """(photo, decoded original, stored detection) of the claimed photos, and the ids of those without a face.

    A photo whose original no longer decodes is rejected here.
    """
    with session_scope() as session:
        boxes = {f.image_id: (tuple(f.box), f.rotation or 0.0) for f in session.scalars(
            select(Face).where(Face.image_id.in_([i.id for i in batch])))}
    items, gone = [], []
    for image in batch:
        if image.id not in boxes:
            gone.append(image.id)
            continue
        try:
            rgb = resources.original_rgb(image)
        except ImageRejected as exc:
            photos.reject(image.id, exc.reason, ImageStatus.aligning)
            continue
        box, rotation = boxes[image.id]
        items.append((image, rgb, Detection(DetectedFace(box, 1.0), 1, rotation)))
    return items, gone

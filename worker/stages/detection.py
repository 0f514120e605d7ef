"""Detection of a claimed batch: decode, one detector pass, faces and rejections in one transaction."""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from shared import photos
from shared.db import session_scope, upsert
from shared.ml.preprocess.imaging import ImageRejected
from shared.models import Face, Image, ImageStatus
from worker.stages import resources
from worker.stages.claims import CLAIM_AT, locked, reject_in

FACE_COLUMNS = ("box", "confidence", "faces_found", "rotation", "detector", "weights")
# A batch's faces: one upsert executed with a list of rows (compiled once, not once per batch size).
_FACES = upsert(Face, ["image_id"], list(FACE_COLUMNS))


def _load(image: Image) -> np.ndarray | ImageRejected:
    try:
        return resources.original_rgb(image)
    except ImageRejected as exc:
        return exc


def _detect_loaded(loaded: list[np.ndarray | ImageRejected]) -> list:
    """The detector's result for each decoded photo in one batch; the rejection for those that did not decode."""
    usable = [k for k, rgb in enumerate(loaded) if not isinstance(rgb, ImageRejected)]
    found: list = list(loaded)
    for k, result in zip(usable, resources.preprocessor().detect_batch([loaded[k] for k in usable]), strict=True):
        found[k] = result
    return found


def _face_row(image_id: int, result: Any, provenance: dict) -> dict:
    return {"image_id": image_id, "box": [float(c) for c in result.face.box],
            "confidence": result.face.score, "faces_found": int(result.faces_found),
            "rotation": result.rotation, "detector": provenance["detector"],
            "weights": {"detector": provenance["detector_sha256"]}}


def detect_batch(batch: list[Image], fused: bool) -> list[tuple[Image, np.ndarray, Any]]:
    """Decode, detect in one batch, and record faces and rejections in one transaction.

    Returns (photo, decoded original, detection) of the photos that go on to alignment.
    """
    loaded = list(resources.io_pool().map(_load, batch))
    found = _detect_loaded(loaded)
    provenance = resources.preprocessor().provenance
    now = time.time()
    out = []
    with session_scope() as session:
        rows = locked(session, [i.id for i in batch], ImageStatus.detecting, "detect")
        faces = []
        for image, rgb, result in zip(batch, loaded, found, strict=True):
            row = rows.get(image.id)
            if row is None:
                continue
            if isinstance(result, ImageRejected):
                reject_in(row, result.reason, now)
                continue
            faces.append(_face_row(image.id, result, provenance))
            if fused:  # this worker aligns it next, under the same claim
                photos.move(row, ImageStatus.aligning, photos.Event.detect, detect_end=now, align_start=now,
                            align_by=resources.node(), **{CLAIM_AT: now})
            else:
                photos.move(row, ImageStatus.aligning, photos.Event.detect, detect_end=now, **{CLAIM_AT: None})
            out.append((image, rgb, result))
        if faces:
            session.execute(_FACES, faces)
    return out

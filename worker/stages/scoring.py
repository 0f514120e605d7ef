"""Scoring a batch: the crops (in memory, or from the object store), one pass of the model's members
(:func:`shared.ml.members.model.predict`), the batch's rows (:mod:`shared.modelops.results`) written at once."""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from shared import photos
from shared.config import get_settings
from shared.db import session_scope
from shared.ml.members.model import predict
from shared.modelops.crops import crop_keys, face_crops, load_crops
from shared.modelops.features import store_feature_rows
from shared.modelops.results import RESULTS, SCORES, batch_rows
from shared.models import Image, ImageStatus
from shared.monitoring import heartbeat
from shared.storage import get_storage
from worker.stages import resources
from worker.stages.claims import CLAIM_AT, locked

logger = logging.getLogger("worker.pipeline")  # the pipeline's log lines keep one name, whichever step writes them


def active_model_or_wait(image_id: int) -> Any | None:
    """The active model, loaded; without one the photo waits for a model (awaiting_model) and this is None."""
    with session_scope() as session:
        loaded = resources.model_cache().active(session, get_storage())
        heartbeat(resources.node(), loaded.name if loaded else None)
        if loaded is None:
            image = session.get(Image, image_id, with_for_update=True)
            if photos.still_in(image, image_id, (ImageStatus.scoring.value,), "no_model"):
                photos.move(image, ImageStatus.awaiting_model, photos.Event.no_model, awaiting_model=time.time())
                logger.info("image=%s state=awaiting_model", image_id)
        return loaded


def _stored(loaded: Any, ready: list[int], crops: dict[int, dict[str, str]]) -> dict[str, np.ndarray]:
    """The batch's stored crops that the model reads, by name (``N x ...`` each), one object read per face."""
    storage = get_storage()
    names = loaded.inputs
    # one object per face; the faces' round trips overlap
    faces = [resources.io_pool().submit(load_crops, storage, crops[i], names) for i in ready]
    faces = [f.result() for f in faces]
    return {name: np.stack([face[name] for face in faces]) for name in names}


def score_stored(loaded: Any, batch: list[int]) -> list[int]:
    """Score the photos of the batch whose crops are stored, in one pass; returns their ids."""
    with session_scope() as session:
        crops = crop_keys(session, batch)
    ready = [i for i in batch if all(r in crops.get(i, {}) for r in loaded.inputs)]
    if ready:
        predict_and_write(loaded, ready, _stored(loaded, ready, crops))
    return ready


def return_to_alignment(image_id: int) -> bool:
    """Send a photo whose crops are lost (or were never made) back to alignment; False when it is gone or final."""
    with session_scope() as session:
        image = session.get(Image, image_id, with_for_update=True)
        if not photos.still_in(image, image_id, (ImageStatus.scoring.value,), "realign"):
            return False
        photos.move(image, ImageStatus.aligning, photos.Event.redo)
    return True


def score_batch(items: list[tuple[Image, Any]]) -> None:
    """Score aligned faces whose crops are in memory: one pass of the members, then the batch's rows."""
    if not items:
        return
    ids = [image.id for image, _ in items]
    with session_scope() as session:
        loaded = resources.model_cache().active(session, get_storage())
        if loaded is None:
            now = time.time()
            for row in locked(session, ids, ImageStatus.scoring, "no_model").values():
                photos.move(row, ImageStatus.awaiting_model, photos.Event.no_model, awaiting_model=now,
                            **{CLAIM_AT: None})
            logger.info("images=%s state=awaiting_model", ids)
            return
    faces = [face_crops(aligned) for _, aligned in items]
    predict_and_write(loaded, ids, {name: np.stack([f[name] for f in faces]) for name in loaded.inputs})
    if len(ids) > 1:
        logger.info("image=%s state=batch scored=%d", ids[0], len(ids))


def predict_and_write(loaded: Any, ids: list[int], crops: dict[str, np.ndarray]) -> None:
    """One pass of the model's members over the batch (the encoder's only when a member reads through it), then
    each photo's scores, ranking, features and descriptors."""
    settings = get_settings()
    runner = resources.encoder_runner() if loaded.model.needs_encoder else None
    pred = predict(loaded.model, crops, runner, precision=settings.infer_precision, flip_tta=settings.infer_flip_tta)
    write_scores_many(loaded, ids, pred)


def write_scores_many(loaded: Any, ids: list[int], pred: Any) -> None:
    """The batch's member scores, results and features in one transaction (the photos locked in id order) and one
    statement per table; each photo still there moves to done."""
    with session_scope() as session:
        # The photos still waiting for these scores: one cancelled, swept or deleted meanwhile is left as it is.
        images = locked(session, ids, ImageStatus.scoring, "score")
        kept = [k for k, image_id in enumerate(ids) if image_id in images]
        if kept:
            sub = _subset(pred, kept)
            features, scores, results = batch_rows([ids[k] for k in kept], loaded.version_id, loaded.classes,
                                                   loaded.model, sub)
            store_feature_rows(session, features)
            if scores:
                session.execute(SCORES, {"rows": scores})
            session.execute(RESULTS, results)
        now = time.time()
        for k in kept:
            image = images[ids[k]]
            photos.move(image, ImageStatus.done, photos.Event.score, done=now,
                        **({CLAIM_AT: None} if (image.stage_times or {}).get(CLAIM_AT) else {}))
    for k in kept:
        logger.info("image=%s state=done model=%s", ids[k], loaded.version_id)


def _subset(pred: Any, index: list[int]) -> Any:
    """The prediction of the faces at ``index`` only (photos deleted meanwhile are not written)."""
    if len(index) == len(pred.aggregate):
        return pred
    import dataclasses

    from shared.ml.members.base import Scores

    return dataclasses.replace(
        pred, member_probs=pred.member_probs[index], aggregate=pred.aggregate[index],
        scores=[Scores(s.names, s.probs[index], s.features[index], s.feature_key) for s in pred.scores],
        descriptors=None if pred.descriptors is None else {n: d[index] for n, d in pred.descriptors.items()},
        ood=None if pred.ood is None else [pred.ood[k] for k in index])

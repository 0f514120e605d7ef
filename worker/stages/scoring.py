"""Scoring a batch: the crops (in memory, or from the object store), one forward pass, each photo's scores written."""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from shared import photos
from shared.config import get_settings
from shared.db import session_scope, upsert
from shared.ml.formats.ranking import rank
from shared.ml.members.identity import CHIP_REGION, MEMBER
from shared.ml.members.model import predict
from shared.modelops.crops import crop_keys, load_crops
from shared.modelops.features import feature_rows, store_feature_rows
from shared.models import Image, ImageStatus, RegionScore, Result
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


def _fetch_crops(loaded: Any, member: Any, ready: list[int], crops: dict[int, dict[str, str]],
                 names: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    """The region crops (N x R x H x W) and, for a model with an identity member, the face chips."""
    storage = get_storage()
    # one object per face; the faces' round trips overlap
    faces = [resources.io_pool().submit(load_crops, storage, crops[i], names) for i in ready]
    faces = [f.result() for f in faces]
    stack = np.stack([np.stack([face[r] for r in loaded.regions]) for face in faces])
    return stack, (np.stack([face[CHIP_REGION] for face in faces]) if member is not None else None)


def score_stored(loaded: Any, batch: list[int]) -> list[int]:
    """Score the photos of the batch whose crops are stored, in one forward pass; returns their ids."""
    with session_scope() as session:
        crops = crop_keys(session, batch)
    member = loaded.model.identity
    needed = (*loaded.regions, CHIP_REGION) if member is not None else loaded.regions
    ready = [i for i in batch if all(r in crops.get(i, {}) for r in needed)]
    if ready:
        stack, chips = _fetch_crops(loaded, member, ready, crops, needed)
        predict_and_write(loaded, member, ready, stack, chips)
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
    """Score aligned faces whose crops are in memory: one forward pass, then each photo's scores."""
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
    member = getattr(loaded.model, "identity", None)
    stack = np.stack([np.stack([aligned.crops[r] for r in loaded.regions]) for _, aligned in items])
    chips = np.stack([aligned.chip for _, aligned in items]) if member is not None else None
    predict_and_write(loaded, member, ids, stack, chips)
    if len(ids) > 1:
        logger.info("image=%s state=batch scored=%d", ids[0], len(ids))


def predict_and_write(loaded: Any, member: Any, ids: list[int], stack: np.ndarray, chips: np.ndarray | None) -> None:
    """One forward pass over the batch (the identity member's descriptors from the face chips when the
    model has that member), then each photo's scores, ranking and features."""
    settings = get_settings()
    descriptors = None
    if member is not None:
        from shared.ml.nets.encoder import encode

        descriptors = encode(resources.encoder(), chips, precision=settings.infer_precision, flip=member.flip)
    pred = predict(loaded.model, stack, flip_tta=settings.infer_flip_tta, precision=settings.infer_precision,
                   descriptors=descriptors)
    write_scores_many(loaded.version_id, loaded.regions, loaded.classes, loaded.backbone_sha, [
        (image_id, pred.region_probs[k], pred.aggregate[k], pred.features[k], None if descriptors is None else {
            "probs": pred.identity_probs[k], "descriptor": descriptors[k], "feature_key": member.feature_key,
            "ood": pred.ood[k] if pred.ood else None}) for k, image_id in enumerate(ids)])


def write_scores(image_id: int, version_id: int, regions: tuple[str, ...], classes: list[dict],
                 region_probs: np.ndarray, aggregate: np.ndarray, backbone: str, features: np.ndarray,
                 identity: dict | None = None) -> None:
    """Member scores, the ranking and (for retraining and the gallery) the features, in one transaction.

    Args:
        identity: the identity member's ``probs``, the face's ``descriptor`` (stored as a feature of
            the encoder under the member's ``feature_key``) and its ``ood`` score; None for a model without that member.
    """
    write_scores_many(version_id, regions, classes, backbone,
                      [(image_id, region_probs, aggregate, features, identity)])


def _rounded(probs: np.ndarray) -> list[float]:
    """Scores as stored: floats rounded to 6 decimals, in one call (numpy's rounding gave Python's on 1.9 million
    probabilities tried, and is about 7 times faster on a photo's 1,500)."""
    return np.round(np.asarray(probs, np.float64), 6).tolist()


def _score_rows(image_id: int, version_id: int, regions: tuple[str, ...], classes: list[dict],
                region_probs: np.ndarray, aggregate: np.ndarray, identity: dict | None) -> tuple[list[dict], dict]:
    """The photo's member score rows (one per region, and the identity member's) and its result row."""
    rows = [{"image_id": image_id, "model_version_id": version_id, "region": r,
             "scores": _rounded(region_probs[i])} for i, r in enumerate(regions)]
    if identity is not None:
        rows.append({"image_id": image_id, "model_version_id": version_id, "region": MEMBER,
                     "scores": _rounded(identity["probs"])})
    result = {"image_id": image_id, "model_version_id": version_id,
              "scores": _rounded(aggregate), "ranking": rank(aggregate, classes),
              "ood": identity["ood"] if identity is not None else None}
    return rows, result


_SCORES = upsert(RegionScore, ["image_id", "model_version_id", "region"], ["scores"])
_RESULTS = upsert(Result, ["image_id", "model_version_id"], ["scores", "ranking", "ood"])


def write_scores_many(version_id: int, regions: tuple[str, ...], classes: list[dict], backbone: str,
                      faces: list[tuple[int, np.ndarray, np.ndarray, np.ndarray, dict | None]]) -> None:
    """:func:`write_scores` for a scored batch, ``(image_id, region_probs, aggregate, features, identity)``
    each, in one transaction (the photos locked in id order) and one statement per table."""
    with session_scope() as session:
        # The photos still waiting for these scores: one cancelled, swept or deleted meanwhile is left as it is.
        images = locked(session, [f[0] for f in faces], ImageStatus.scoring, "score")
        kept = [f for f in faces if f[0] in images]
        features, scores, results = [], [], []
        for image_id, region_probs, aggregate, feats, identity in kept:
            features += feature_rows(image_id, regions, backbone, feats)
            if identity is not None:
                features += feature_rows(image_id, (MEMBER,), identity["feature_key"], identity["descriptor"][None])
            rows, result = _score_rows(image_id, version_id, regions, classes, region_probs, aggregate, identity)
            scores += rows
            results.append(result)
        store_feature_rows(session, features)
        if kept:
            session.execute(_SCORES, scores)
            session.execute(_RESULTS, results)
        now = time.time()
        for image_id, *_ in kept:
            image = images[image_id]
            photos.move(image, ImageStatus.done, photos.Event.score, done=now,
                        **({CLAIM_AT: None} if (image.stage_times or {}).get(CLAIM_AT) else {}))
    for image_id, *_ in kept:
        logger.info("image=%s state=done model=%s", image_id, version_id)

"""Nightly retraining of the regional heads from newly diagnosed cases, behind a promotion guard.

One run: take the lock, start from the active model's base feature set, add every
image of a case with a confirmed, consented diagnosis (computing backbone features
only for images that have none yet), train new heads, score candidate and active
model on the same subject-disjoint holdout, and promote only if the guard agrees.
Every run is a :class:`TrainingRun` row; a crashed run leaves the active model
untouched, and its lock (a PostgreSQL advisory lock held by its connection) is
released when the process dies.
"""
from __future__ import annotations

import logging
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from shared.config import Settings, get_settings
from shared.db import get_engine, session_scope
from shared.ml import heads as hd
from shared.ml.gestalt import load_checkpoint, resolve_device
from shared.ml.identity import IdentityMember, build_ood_reference, combine, fit_identity_head
from shared.ml.imaging import decode_png_gray
from shared.ml.splits import in_holdout
from shared.modelops.features import cached_descriptors, cached_features
from shared.modelops.registry import activate, active_version, register_model
from shared.models import (
    Case,
    Crop,
    Diagnosis,
    Face,
    Image,
    ModelStatus,
    ModelVersion,
    Syndrome,
    TrainingRun,
)
from shared.storage import Storage, feature_set_key, get_storage

logger = logging.getLogger(__name__)

LOCK_KEY = 0x6765737461  # "gesta": one retraining run at a time, cluster-wide


@contextmanager
def retrain_lock():
    """Yields True when this process holds the lock. The lock lives on a dedicated connection,
    so PostgreSQL releases it by itself if the process dies."""
    conn = get_engine().connect()
    try:
        got = bool(conn.execute(text("select pg_try_advisory_lock(:k)"), {"k": LOCK_KEY}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("select pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                conn.commit()
    finally:
        conn.close()


@dataclass
class Dataset:
    features: np.ndarray  # N x R x F
    labels: list[str]
    subjects: list[str]
    holdout: np.ndarray  # N bool
    identity: np.ndarray | None = None  # N x 128 identity descriptors (models with an identity member)


def _finish(run_id: int, status: str, decision: str, **fields) -> None:
    with session_scope() as s:
        run = s.get(TrainingRun, run_id)
        run.status = status
        run.decision = decision[:1000]
        run.finished_at = datetime.now(UTC)
        for k, v in fields.items():
            setattr(run, k, v)
    logger.info("retrain run=%d status=%s decision=%r", run_id, status, decision)


def diagnosed_images(session: Session) -> list[tuple[int, str, str, str]]:
    """(image id, syndrome name, subject, sha256) of scored images of consented, diagnosed cases."""
    rows = session.execute(
        select(Image.id, Syndrome.name, Case.id, Image.sha256)
        .join(Case, Case.id == Image.case_id).join(Diagnosis, Diagnosis.case_id == Case.id)
        .join(Syndrome, Syndrome.id == Diagnosis.syndrome_id)
        .where(Diagnosis.consent.is_(True), Image.status == "done").order_by(Image.id)).all()
    return [(image_id, name, f"case:{case_id}", sha) for image_id, name, case_id, sha in rows]


def run_retrain(trigger: str, dry_run: bool = False, shuffle_labels: bool = False,
                settings: Settings | None = None, kind: str = "heads") -> int:
    """One retraining run; returns its TrainingRun id.

    Args:
        trigger: who started it ("beat", "cli", "admin").
        kind: "heads" (from cached features; nightly) or "full" (fine-tune every layer from the crops).
        dry_run: build, train and evaluate, but register and promote nothing.
        shuffle_labels: a negative control; the guard must reject the resulting candidate.
    """
    settings = settings or get_settings()
    host = socket.gethostname()
    with retrain_lock() as held:
        if not held:
            with session_scope() as s:
                run = TrainingRun(trigger=trigger, status="skipped", host=host,
                                  decision="another retraining run holds the lock",
                                  finished_at=datetime.now(UTC))
                s.add(run)
                s.flush()
                return run.id
        with session_scope() as s:
            # We hold the lock, so any run still marked running died without finishing.
            s.execute(update(TrainingRun).where(TrainingRun.status == "running").values(
                status="failed", decision="interrupted: the process stopped before the run finished",
                finished_at=datetime.now(UTC)))
            run = TrainingRun(trigger=trigger, status="running", host=host, kind=kind)
            s.add(run)
            s.flush()
            run_id = run.id
        try:
            return _run(run_id, dry_run, shuffle_labels, settings, kind)
        except Exception as exc:
            logger.exception("retrain run=%d failed", run_id)
            _finish(run_id, "failed", f"{type(exc).__name__}: {exc}")
            raise


def _run(run_id: int, dry_run: bool, shuffle_labels: bool, settings: Settings, kind: str) -> int:
    t0 = time.monotonic()
    durations: dict[str, float] = {}
    storage = get_storage()
    with session_scope() as s:
        active = active_version(s)
        if active is None:
            _finish(run_id, "skipped", "no active model to start from")
            return run_id
        s.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(base_version_id=active.id))
        active_id, active_name = active.id, active.name
        active_classes = [c["name"] for c in active.classes]
        base_key = active.config.get("base_features_key")
        checkpoint_key = active.checkpoint_key
        active_config = dict(active.config)
    if not base_key:
        _finish(run_id, "skipped", f"model {active_name} has no base feature set; retrain it with `gestalt train`")
        return run_id
    crops_key = active_config.get("base_crops_key") if kind == "full" else None
    if kind == "full" and not crops_key:
        _finish(run_id, "skipped", f"model {active_name} has no stored base crops for a full fine-tune")
        return run_id
    model, _ = load_checkpoint(storage.get(checkpoint_key))
    backbone = hd.backbone_sha(model)
    base = hd.load_feature_set(storage.get(base_key))
    member = model.identity
    if member is not None and "identity" not in base:
        _finish(run_id, "skipped", f"the base feature set of model {active_name} lacks the identity member's "
                                   "descriptors; retrain it with `gestalt train`")
        return run_id
    durations["load"] = time.monotonic() - t0

    t = time.monotonic()
    with session_scope() as s:
        diagnosed = diagnosed_images(s)
        feats, computed = cached_features(s, storage, model, backbone, [d[0] for d in diagnosed])
        descriptors = None
        if member is not None:  # a photo joins only with its identity descriptor too
            descriptors, computed_id = cached_descriptors(s, storage, member, [d[0] for d in diagnosed],
                                                          str(resolve_device(settings.device)))
            feats = {i: f for i, f in feats.items() if i in descriptors}
            computed += computed_id
    durations["features"] = time.monotonic() - t
    base_hashes = set(base["sha256"].tolist())
    seen: set[str] = set()
    cases = []
    for image_id, name, subject, sha in diagnosed:
        if image_id in feats and sha not in base_hashes and sha not in seen:  # one copy of each photo
            seen.add(sha)
            cases.append((image_id, name, subject))

    # Classes: the active model's, then new syndromes with enough subjects.
    subjects_per: dict[str, set[str]] = {}
    for label, subject in zip(base["labels"].tolist(), base["subjects"].tolist(), strict=True):
        subjects_per.setdefault(label, set()).add(subject)
    for _, name, subject in cases:
        subjects_per.setdefault(name, set()).add(subject)
    new_classes = sorted(n for n, subs in subjects_per.items()
                         if n not in active_classes and len(subs) >= settings.retrain_min_subjects)
    classes = active_classes + new_classes
    index = {n: i for i, n in enumerate(classes)}
    in_model = [c for c in cases if c[1] in index]
    data = build_dataset(base, in_model, feats, settings.retrain_holdout_fraction, descriptors)
    labels = np.array([index[n] for n in data.labels])
    counts = {
        "base_images": int(len(base["labels"])), "diagnosed_images": len(diagnosed), "case_images": len(in_model),
        "gallery_only_images": len(cases) - len(in_model), "features_computed": computed,
        "classes": len(classes), "new_classes": new_classes,
        "train_images": int((~data.holdout).sum()), "holdout_images": int(data.holdout.sum()),
    }

    t = time.monotonic()
    train = ~data.holdout
    train_labels = labels[train]
    if shuffle_labels:
        train_labels = np.random.default_rng(0).permutation(train_labels)
    new_heads = hd.train_heads(data.features[train], train_labels, len(classes),
                               hd.HeadConfig(epochs=settings.retrain_epochs))
    new_member = _retrain_member(member, data, train_labels, len(classes)) if member is not None else None
    durations["train"] = time.monotonic() - t

    t = time.monotonic()
    hold = data.holdout
    config = {"base_features_key": base_key, "base_crops_key": active_config.get("base_crops_key")}
    if kind == "full":
        candidate, cand_probs, act_probs, config["base_features_key"] = _fine_tune(
            model, hd.with_heads(model, new_heads), classes, labels, train_labels, data, in_model, crops_key,
            storage, settings, new_member)
        durations["train"] += time.monotonic() - t
    else:
        candidate = hd.with_heads(model, new_heads)
        candidate.identity = new_member
        identity_hold = data.identity[hold] if data.identity is not None else None
        cand_probs = _aggregate(new_heads.probs(data.features[hold]), new_member, identity_hold)
        act_probs = _aggregate(hd.heads_of(model).probs(data.features[hold]), member, identity_hold)
    act_labels = np.where(labels[hold] < len(active_classes), labels[hold], -1)
    guard = hd.promotion_guard(cand_probs, act_probs, labels[hold], act_labels, classes, settings.retrain_tolerance)
    durations["evaluate"] = time.monotonic() - t
    durations["total"] = time.monotonic() - t0
    metrics = {"candidate": guard.candidate, "active": guard.active}
    if dry_run:
        verdict = "would promote" if guard.promote else "would reject"
        _finish(run_id, "dry_run", f"{verdict}: {guard.reason}", counts=counts, durations=durations, metrics=metrics)
        return run_id

    with session_scope() as s:
        version = register_model(
            s, storage, candidate, classes, {"holdout": guard.candidate, "guard": guard.reason, "training_run": run_id},
            name=f"{active_name.split('+')[0]}+r{run_id}",
            config={**config, "parent_version_id": active_id, "training_run_id": run_id})
        run = s.get(TrainingRun, run_id)
        run.candidate_version_id = version.id
        run.counts, run.durations, run.metrics = counts, durations, metrics
        run.finished_at = datetime.now(UTC)
        run.decision = guard.reason[:1000]
        current = active_version(s)
        if guard.promote and current is not None and current.id == active_id:
            activate(s, version)
            run.status = "promoted"
        else:
            version.status = ModelStatus.rejected.value
            run.status = "rejected"
            if guard.promote:  # someone activated another model meanwhile
                run.decision = f"the active model changed during the run; {guard.reason}"[:1000]
    logger.info("retrain run=%d status=%s %s", run_id, "promoted" if guard.promote else "rejected", guard.reason)
    return run_id


def _aggregate(region_probs: np.ndarray, member: IdentityMember | None, descriptors: np.ndarray | None) -> np.ndarray:
    """A model's holdout scores: the regions' mean, combined with its identity member's scores."""
    if member is None:
        return combine(region_probs, None, 0.0)
    return combine(region_probs, member.head.probs(descriptors), member.weight)


def _retrain_member(member: IdentityMember, data: Dataset, train_labels: np.ndarray, n_classes: int) -> IdentityMember:
    """The identity member refitted on the night's training photos: its head (kind chosen again on grouped
    folds) and OOD reference are new, its weight in the aggregate is the one chosen at training time."""
    train, hold = ~data.holdout, data.holdout
    head = fit_identity_head(data.identity[train], train_labels, n_classes, np.asarray(data.subjects)[train])
    ood = build_ood_reference(data.identity[train], data.identity[hold] if hold.any() else None)
    return IdentityMember(head, member.weight, ood, member.encoder_sha, member.validation, member.flip)


def _fine_tune(model, init, classes: list[str], labels: np.ndarray, train_labels: np.ndarray, data: Dataset,
               cases: list[tuple[int, str, str]], crops_key: str, storage: Storage, settings: Settings,
               member: IdentityMember | None = None):
    """Fine-tune every layer (the paper's recipe: SGD 5e-3, momentum 0.9, augmentation) from the crops.

    Returns the candidate, both models' holdout probabilities, and the key of the base
    feature set recomputed under the candidate's new backbone.
    """
    from shared.ml.data import Sample
    from shared.ml.gestalt import predict, resolve_device
    from shared.ml.training import PreparedData, TrainConfig, train_ensemble

    base = hd.load_feature_set(storage.get(crops_key))
    regions = list(model.regions)
    with session_scope() as s:
        keys = {(fid, c.region): c.object_key for fid, c in s.execute(
            select(Face.image_id, Crop).join(Crop, Crop.face_id == Face.id)
            .where(Face.image_id.in_([i for i, _, _ in cases])))}
    case_crops = [np.stack([decode_png_gray(storage.get(keys[(i, r)])) for r in regions]) for i, _, _ in cases]
    crops = np.concatenate([base["crops"], np.stack(case_crops)]) if case_crops else base["crops"]
    prepared = PreparedData(crops=crops, labels=labels.copy(), samples=[
        Sample(Path(""), lab, subj) for lab, subj in zip(data.labels, data.subjects, strict=True)])
    train_idx = list(np.flatnonzero(~data.holdout))
    prepared.labels[train_idx] = train_labels
    cfg = TrainConfig(width=model.width, epochs=settings.retrain_full_epochs, lr=5e-3, optimizer="sgd",
                      device=str(resolve_device(settings.device)), progress=False)
    candidate, _ = train_ensemble(prepared, classes, model.regions, train_idx, [], cfg, init=init)
    candidate.identity = member
    hold = data.holdout
    identity_hold = data.identity[hold] if data.identity is not None else None
    cand_probs = predict(candidate, crops[hold], descriptors=identity_hold).aggregate
    act_probs = predict(model, crops[hold], descriptors=identity_hold).aggregate
    n_base = len(base["labels"])
    blob = hd.save_feature_set(hd.extract_features(candidate, crops[:n_base]), base["labels"].tolist(),
                               base["subjects"].tolist(), base["holdout"], base["sha256"].tolist(),
                               identity=data.identity[:n_base] if data.identity is not None else None)
    key = storage.put(feature_set_key(hd.backbone_sha(candidate), blob), blob)
    return candidate, cand_probs, act_probs, key


def build_dataset(base: dict, cases: list[tuple[int, str, str]], feats: dict[int, np.ndarray],
                  holdout_fraction: float, descriptors: dict[int, np.ndarray] | None = None) -> Dataset:
    """Base features plus case features; case subjects are held out by a stable hash. With ``descriptors``
    (per case image), the base set's identity descriptors and the cases' are kept too."""
    features = [base["features"]] + ([np.stack([feats[i] for i, _, _ in cases])] if cases else [])
    identity = None
    if descriptors is not None:
        identity = np.concatenate([base["identity"]] + ([np.stack([descriptors[i] for i, _, _ in cases])]
                                                        if cases else [])).astype(np.float32)
    return Dataset(
        features=np.concatenate(features).astype(np.float32),
        labels=base["labels"].tolist() + [n for _, n, _ in cases],
        subjects=base["subjects"].tolist() + [s for _, _, s in cases],
        holdout=np.concatenate([base["holdout"], np.array([in_holdout(s, holdout_fraction) for _, _, s in cases],
                                                          bool)]), identity=identity)


def latest_runs(session: Session, limit: int = 20) -> list[TrainingRun]:
    return list(session.scalars(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)))


def rollback(session: Session) -> ModelVersion:
    """Re-activate the version that was active before the current one."""
    previous = session.scalars(select(ModelVersion).where(ModelVersion.status == ModelStatus.retired.value,
                                                          ModelVersion.activated_at.isnot(None))
                               .order_by(ModelVersion.activated_at.desc())).first()
    if previous is None:
        raise LookupError("no earlier active version to roll back to")
    activate(session, previous)
    return previous

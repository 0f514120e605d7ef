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

import numpy as np
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from shared.config import Settings, get_settings
from shared.db import get_engine, session_scope
from shared.ml.members.identity import IdentityMember
from shared.ml.nets.ensemble import RegionalEnsemble
from shared.ml.runtime.device import resolve_device
from shared.ml.train import heads as hd
from shared.ml.train.checkpoint import load_checkpoint
from shared.modelops.features import cached_descriptors, cached_features
from shared.modelops.registry import activate, active_version, register_model
from shared.modelops.retrain_candidate import (
    Dataset,
    aggregate_scores,
    build_dataset,
    fine_tune,
    retrain_member,
)
from shared.models import (
    Case,
    Diagnosis,
    Image,
    ModelStatus,
    ModelVersion,
    Syndrome,
    TrainingRun,
)
from shared.storage import Storage, get_storage

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


@dataclass
class _Base:
    """What a run starts from: the active version, its checkpoint and its base feature set."""

    version_id: int
    name: str
    classes: list[str]
    config: dict  # the active version's
    features_key: str
    crops_key: str | None  # full fine-tunes only
    model: RegionalEnsemble
    member: IdentityMember | None  # the model's identity member, if any
    backbone: str
    features: dict[str, np.ndarray]  # the base feature set


@dataclass
class _TrainingSet:
    """The night's training set: the classes (the active model's, then new syndromes) and the photos."""

    classes: list[str]
    new_classes: list[str]
    cases: list[tuple[int, str, str]]  # (image id, syndrome, subject) of the new case photos
    in_model: list[tuple[int, str, str]]  # those of a class of the model
    data: Dataset
    labels: np.ndarray  # per photo of ``data``: its class index


def _run(run_id: int, dry_run: bool, shuffle_labels: bool, settings: Settings, kind: str) -> int:
    t0 = time.monotonic()
    durations: dict[str, float] = {}
    storage = get_storage()
    base = _load_base(run_id, kind, storage)
    if base is None:
        return run_id
    durations["load"] = time.monotonic() - t0

    t = time.monotonic()
    diagnosed, feats, computed, descriptors = _case_features(storage, base, settings)
    durations["features"] = time.monotonic() - t
    ts = _training_set(base, diagnosed, feats, descriptors, settings)
    counts = _counts(base, diagnosed, computed, ts)

    t = time.monotonic()
    train_labels = ts.labels[~ts.data.holdout]
    if shuffle_labels:
        train_labels = np.random.default_rng(0).permutation(train_labels)
    new_heads = hd.train_heads(ts.data.features[~ts.data.holdout], train_labels, len(ts.classes),
                               hd.HeadConfig(epochs=settings.retrain_epochs))
    new_member = (retrain_member(base.member, ts.data, train_labels, len(ts.classes))
                  if base.member is not None else None)
    durations["train"] = time.monotonic() - t

    t = time.monotonic()
    candidate, cand_probs, act_probs, config = _candidate(kind, base, ts, train_labels, new_heads, new_member,
                                                          storage, settings)
    if kind == "full":
        durations["train"] += time.monotonic() - t
    hold = ts.data.holdout
    act_labels = np.where(ts.labels[hold] < len(base.classes), ts.labels[hold], -1)
    guard = hd.promotion_guard(cand_probs, act_probs, ts.labels[hold], act_labels, ts.classes,
                               settings.retrain_tolerance)
    durations["evaluate"] = time.monotonic() - t
    durations["total"] = time.monotonic() - t0
    metrics = {"candidate": guard.candidate, "active": guard.active}
    if dry_run:
        verdict = "would promote" if guard.promote else "would reject"
        _finish(run_id, "dry_run", f"{verdict}: {guard.reason}", counts=counts, durations=durations, metrics=metrics)
        return run_id
    _register(run_id, storage, base, candidate, ts.classes, guard, config,
              {"counts": counts, "durations": durations, "metrics": metrics})
    return run_id


def _load_base(run_id: int, kind: str, storage: Storage) -> _Base | None:
    """The active model and its base feature set; None (the run finished as skipped) when there is no
    active model, it has no base feature set (or crops, for a full fine-tune), or the set lacks the
    identity member's descriptors."""
    with session_scope() as s:
        active = active_version(s)
        if active is None:
            _finish(run_id, "skipped", "no active model to start from")
            return None
        s.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(base_version_id=active.id))
        active_id, active_name = active.id, active.name
        active_classes = [c["name"] for c in active.classes]
        base_key = active.config.get("base_features_key")
        checkpoint_key = active.checkpoint_key
        active_config = dict(active.config)
    if not base_key:
        _finish(run_id, "skipped", f"model {active_name} has no base feature set; retrain it with `gestalt train`")
        return None
    crops_key = active_config.get("base_crops_key") if kind == "full" else None
    if kind == "full" and not crops_key:
        _finish(run_id, "skipped", f"model {active_name} has no stored base crops for a full fine-tune")
        return None
    model, _ = load_checkpoint(storage.get(checkpoint_key))
    backbone = hd.backbone_sha(model)
    features = hd.load_feature_set(storage.get(base_key))
    if model.identity is not None and "identity" not in features:
        _finish(run_id, "skipped", f"the base feature set of model {active_name} lacks the identity member's "
                                   "descriptors; retrain it with `gestalt train`")
        return None
    return _Base(active_id, active_name, active_classes, active_config, base_key, crops_key, model, model.identity,
                 backbone, features)


def _case_features(storage: Storage, base: _Base, settings: Settings):
    """The diagnosed images, the backbone features of those that have them (computed where missing), how many
    were computed, and with an identity member the images' descriptors (a photo joins only with one)."""
    with session_scope() as s:
        diagnosed = diagnosed_images(s)
        feats, computed = cached_features(s, storage, base.model, base.backbone, [d[0] for d in diagnosed])
        descriptors = None
        if base.member is not None:  # a photo joins only with its identity descriptor too
            descriptors, computed_id = cached_descriptors(s, storage, base.member, [d[0] for d in diagnosed],
                                                          str(resolve_device(settings.device)))
            feats = {i: f for i, f in feats.items() if i in descriptors}
            computed += computed_id
    return diagnosed, feats, computed, descriptors


def _training_set(base: _Base, diagnosed: list[tuple[int, str, str, str]], feats: dict[int, np.ndarray],
                  descriptors: dict[int, np.ndarray] | None, settings: Settings) -> _TrainingSet:
    """The new case photos (one copy of each, none already in the base set), the classes, and the dataset."""
    base_hashes = set(base.features["sha256"].tolist())
    seen: set[str] = set()
    cases = []
    for image_id, name, subject, sha in diagnosed:
        if image_id in feats and sha not in base_hashes and sha not in seen:  # one copy of each photo
            seen.add(sha)
            cases.append((image_id, name, subject))
    new_classes = _new_classes(base, cases, settings.retrain_min_subjects)
    classes = base.classes + new_classes
    index = {n: i for i, n in enumerate(classes)}
    in_model = [c for c in cases if c[1] in index]
    data = build_dataset(base.features, in_model, feats, settings.retrain_holdout_fraction, descriptors)
    return _TrainingSet(classes, new_classes, cases, in_model, data, np.array([index[n] for n in data.labels]))


def _new_classes(base: _Base, cases: list[tuple[int, str, str]], min_subjects: int) -> list[str]:
    """Syndromes the active model lacks that now have enough subjects (base set and cases together)."""
    subjects_per: dict[str, set[str]] = {}
    for label, subject in zip(base.features["labels"].tolist(), base.features["subjects"].tolist(), strict=True):
        subjects_per.setdefault(label, set()).add(subject)
    for _, name, subject in cases:
        subjects_per.setdefault(name, set()).add(subject)
    return sorted(n for n, subs in subjects_per.items() if n not in base.classes and len(subs) >= min_subjects)


def _counts(base: _Base, diagnosed: list, computed: int, ts: _TrainingSet) -> dict:
    """The run's image and class counts, as its TrainingRun row records them."""
    return {
        "base_images": int(len(base.features["labels"])), "diagnosed_images": len(diagnosed),
        "case_images": len(ts.in_model), "gallery_only_images": len(ts.cases) - len(ts.in_model),
        "features_computed": computed, "classes": len(ts.classes), "new_classes": ts.new_classes,
        "train_images": int((~ts.data.holdout).sum()), "holdout_images": int(ts.data.holdout.sum()),
    }


def _candidate(kind: str, base: _Base, ts: _TrainingSet, train_labels: np.ndarray, new_heads: hd.Heads,
               new_member: IdentityMember | None, storage: Storage, settings: Settings):
    """The candidate (new heads, or with ``kind`` "full" every layer fine-tuned), its and the active model's
    holdout scores, and the feature-set keys the candidate version records."""
    hold = ts.data.holdout
    config = {"base_features_key": base.features_key, "base_crops_key": base.config.get("base_crops_key")}
    if kind == "full":
        candidate, cand_probs, act_probs, config["base_features_key"] = fine_tune(
            base.model, hd.with_heads(base.model, new_heads), ts.classes, ts.labels, train_labels, ts.data,
            ts.in_model, base.crops_key, storage, settings, new_member)
        return candidate, cand_probs, act_probs, config
    candidate = hd.with_heads(base.model, new_heads)
    candidate.identity = new_member
    identity_hold = ts.data.identity[hold] if ts.data.identity is not None else None
    cand_probs = aggregate_scores(new_heads.probs(ts.data.features[hold]), new_member, identity_hold)
    act_probs = aggregate_scores(hd.heads_of(base.model).probs(ts.data.features[hold]), base.member, identity_hold)
    return candidate, cand_probs, act_probs, config


def _register(run_id: int, storage: Storage, base: _Base, candidate: RegionalEnsemble, classes: list[str],
              guard: hd.GuardResult, config: dict, record: dict) -> None:
    """Register the candidate version and promote it when the guard agrees and the active model is still the
    one the run started from; otherwise it is rejected. ``record``: the run's counts, durations and metrics."""
    with session_scope() as s:
        version = register_model(
            s, storage, candidate, classes, {"holdout": guard.candidate, "guard": guard.reason, "training_run": run_id},
            name=f"{base.name.split('+')[0]}+r{run_id}",
            config={**config, "parent_version_id": base.version_id, "training_run_id": run_id})
        run = s.get(TrainingRun, run_id)
        run.candidate_version_id = version.id
        run.counts, run.durations, run.metrics = record["counts"], record["durations"], record["metrics"]
        run.finished_at = datetime.now(UTC)
        run.decision = guard.reason[:1000]
        current = active_version(s)
        if guard.promote and current is not None and current.id == base.version_id:
            activate(s, version)
            run.status = "promoted"
        else:
            version.status = ModelStatus.rejected.value
            run.status = "rejected"
            if guard.promote:  # someone activated another model meanwhile
                run.decision = f"the active model changed during the run; {guard.reason}"[:1000]
        stored, decision = run.status, run.decision
    logger.info("retrain run=%d status=%s %s", run_id, stored, decision)


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

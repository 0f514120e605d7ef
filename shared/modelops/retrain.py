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
from shared.ml.members.model import GestaltModel
from shared.ml.runtime.device import resolve_device
from shared.ml.train import heads as hd
from shared.ml.train.checkpoint import load_checkpoint
from shared.ml.train.refit import refit
from shared.modelops.registry import activate, active_version, register_model
from shared.modelops.retrain_candidate import (
    Dataset,
    build_dataset,
    case_vectors,
    fine_tune,
    holdout_scores,
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
    """What a run starts from: the active version, its model and its base feature set (none for the gallery
    model, whose first heads are fitted on the gallery's diagnosed photos alone)."""

    version_id: int
    name: str
    classes: list[str]
    config: dict  # the active version's
    features_key: str | None
    crops_key: str | None  # full fine-tunes only
    model: GestaltModel
    features: dict[str, np.ndarray] | None  # the base feature set


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
    diagnosed, feats, computed = _case_features(storage, base, settings)
    durations["features"] = time.monotonic() - t
    ts = _training_set(base, diagnosed, feats, settings)
    counts = _counts(base, diagnosed, computed, ts)
    if not base.model.members:
        short = first_model_shortfall(ts, settings.retrain_min_subjects, settings.retrain_min_syndromes)
        if short:
            _finish(run_id, "skipped", f"the gallery model stays: {short}", counts=counts)
            return run_id

    t = time.monotonic()
    train_labels = ts.labels[~ts.data.holdout]
    if shuffle_labels:
        train_labels = np.random.default_rng(0).permutation(train_labels)
    labels = ts.labels.copy()
    labels[~ts.data.holdout] = train_labels
    candidate = refit(base.model, ts.data.features, ~ts.data.holdout, labels, ts.data.subjects, ts.classes,
                      settings.retrain_epochs)
    durations["train"] = time.monotonic() - t

    t = time.monotonic()
    candidate, cand_probs, act_probs, config = _candidate(kind, base, ts, train_labels, candidate, storage, settings)
    if kind == "full":
        durations["train"] += time.monotonic() - t
    hold = ts.data.holdout
    act_labels = np.where(ts.labels[hold] < len(base.classes), ts.labels[hold], -1)
    guard = hd.promotion_guard(cand_probs, act_probs, ts.labels[hold], act_labels, ts.classes,
                               settings.retrain_tolerance)
    durations["evaluate"] = time.monotonic() - t
    durations["total"] = time.monotonic() - t0
    metrics = {"candidate": guard.candidate, "active": guard.active, "weights": candidate.stack.share_of()}
    if dry_run:
        verdict = "would promote" if guard.promote else "would reject"
        _finish(run_id, "dry_run", f"{verdict}: {guard.reason}", counts=counts, durations=durations, metrics=metrics)
        return run_id
    _register(run_id, storage, base, candidate, guard, config,
              {"counts": counts, "durations": durations, "metrics": metrics})
    return run_id


def first_model_shortfall(ts: _TrainingSet, min_subjects: int, min_syndromes: int) -> str | None:
    """Why the gallery's diagnosed photos are not yet enough for a first trained model (None when they are): at
    least ``min_syndromes`` syndromes with ``min_subjects`` patients each, and held-out patients to judge it on."""
    enough = [c for c in ts.classes if len({s for s, lab in zip(ts.data.subjects, ts.data.labels, strict=True)
                                             if lab == c}) >= min_subjects]
    if len(enough) < min_syndromes:
        return (f"{len(enough)} syndrome(s) have {min_subjects} or more diagnosed, consented patients; "
                f"{min_syndromes} are needed to train and validate heads")
    if not ts.data.holdout.any() or ts.data.holdout.all():
        return "the diagnosed patients cannot yet be split into training and held-out patients"
    return None


def _load_base(run_id: int, kind: str, storage: Storage) -> _Base | None:
    """The active model and its base feature set; None (the run finished as skipped) when there is no active
    model, a trained one has no base feature set (or crops, for a full fine-tune), or a full fine-tune is asked of
    a model without CASIA-Nets."""
    with session_scope() as s:
        active = active_version(s)
        if active is None:
            _finish(run_id, "skipped", "no active model to start from")
            return None
        s.execute(update(TrainingRun).where(TrainingRun.id == run_id).values(base_version_id=active.id))
        active_id, active_name = active.id, active.name
        active_classes = [c["name"] for c in active.classes]
        checkpoint_key, config = active.checkpoint_key, dict(active.config)
    model, _ = load_checkpoint(storage.get(checkpoint_key))
    base_key = config.get("base_features_key")
    crops_key = config.get("base_crops_key") if kind == "full" else None
    if kind == "full" and model.member("casia") is None:
        _finish(run_id, "skipped", f"model {active_name} has no CASIA-Nets to fine-tune; its members are heads on "
                                   "the frozen encoder, which a heads run refits")
        return None
    if model.members and not base_key:
        _finish(run_id, "skipped", f"model {active_name} has no base feature set; retrain it with `gestalt train`")
        return None
    if kind == "full" and not crops_key:
        _finish(run_id, "skipped", f"model {active_name} has no stored base crops for a full fine-tune")
        return None
    features = hd.load_feature_set(storage.get(base_key)) if base_key else None
    if features is not None and model.member("identity") is not None and "identity" not in features:
        _finish(run_id, "skipped", f"the base feature set of model {active_name} lacks the identity member's "
                                   "descriptors; retrain it with `gestalt train`")
        return None
    return _Base(active_id, active_name, active_classes, config, base_key, crops_key, model, features)


def _case_features(storage: Storage, base: _Base, settings: Settings):
    """The diagnosed images, the features each of the model's members reads for those that have them (computed
    where missing), and how many photos' features were computed."""
    from shared.ml.train.members import encoder_fn

    device = str(resolve_device(settings.device))
    encode = encoder_fn(device) if base.model.needs_encoder else None
    with session_scope() as s:
        diagnosed = diagnosed_images(s)
        feats, computed = case_vectors(s, storage, base.model, [d[0] for d in diagnosed], encode)
    return diagnosed, feats, computed


def _training_set(base: _Base, diagnosed: list[tuple[int, str, str, str]], feats: dict,
                  settings: Settings) -> _TrainingSet:
    """The new case photos (one copy of each, none already in the base set), the classes, and the dataset."""
    base_hashes = set(base.features["sha256"].tolist()) if base.features is not None else set()
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
    regions = next(iter(feats.values())).regions if feats else base.model.regions
    data = build_dataset(base.features, in_model, feats, settings.retrain_holdout_fraction, regions)
    return _TrainingSet(classes, new_classes, cases, in_model, data, np.array([index[n] for n in data.labels], int))


def _new_classes(base: _Base, cases: list[tuple[int, str, str]], min_subjects: int) -> list[str]:
    """Syndromes the active model lacks that now have enough subjects (base set and cases together)."""
    subjects_per: dict[str, set[str]] = {}
    if base.features is not None:
        for label, subject in zip(base.features["labels"].tolist(), base.features["subjects"].tolist(), strict=True):
            subjects_per.setdefault(label, set()).add(subject)
    for _, name, subject in cases:
        subjects_per.setdefault(name, set()).add(subject)
    return sorted(n for n, subs in subjects_per.items() if n not in base.classes and len(subs) >= min_subjects)


def _counts(base: _Base, diagnosed: list, computed: int, ts: _TrainingSet) -> dict:
    """The run's image and class counts, as its TrainingRun row records them."""
    return {
        "base_images": int(len(base.features["labels"])) if base.features is not None else 0,
        "diagnosed_images": len(diagnosed), "case_images": len(ts.in_model),
        "gallery_only_images": len(ts.cases) - len(ts.in_model),
        "features_computed": computed, "classes": len(ts.classes), "new_classes": ts.new_classes,
        "train_images": int((~ts.data.holdout).sum()), "holdout_images": int(ts.data.holdout.sum()),
    }


def _candidate(kind: str, base: _Base, ts: _TrainingSet, train_labels: np.ndarray, candidate: GestaltModel,
               storage: Storage, settings: Settings):
    """The candidate (refitted members, or with ``kind`` "full" its CASIA-Nets fine-tuned too), its and the active
    model's holdout scores, and the feature-set keys the candidate version records."""
    config = {"base_features_key": base.features_key, "base_crops_key": base.config.get("base_crops_key")}
    if kind == "full":
        init = hd.with_heads(base.model.member("casia").net, hd.heads_of(candidate.member("casia").net))
        candidate, cand_probs, act_probs, config["base_features_key"] = fine_tune(
            base.model, init, ts.classes, ts.labels, train_labels, ts.data, ts.in_model, base.crops_key, storage,
            settings, candidate)
        return candidate, cand_probs, act_probs, config
    if base.features is None:  # the first trained model: its training set becomes its base feature set
        config["base_features_key"] = _store_first_base(storage, candidate, ts)
    return candidate, holdout_scores(candidate, ts.data, ts.labels), holdout_scores(base.model, ts.data, ts.labels), \
        config


def _store_first_base(storage: Storage, candidate: GestaltModel, ts: _TrainingSet) -> str:
    """The gallery's photos that the first trained model was fitted on, stored as its base feature set."""
    blob = hd.save_feature_set(ts.data.features.features, ts.data.labels, ts.data.subjects, ts.data.holdout,
                               [""] * len(ts.data.labels), identity=ts.data.features.identity)
    key = candidate.member("encoder_regions").feature_key
    return storage.put(feature_set_key(key, blob), blob)


def _register(run_id: int, storage: Storage, base: _Base, candidate: GestaltModel, guard: hd.GuardResult,
              config: dict, record: dict) -> None:
    """Register the candidate version and promote it when the guard agrees and the active model is still the
    one the run started from; otherwise it is rejected. ``record``: the run's counts, durations and metrics."""
    with session_scope() as s:
        version = register_model(
            s, storage, candidate, {"holdout": guard.candidate, "guard": guard.reason, "training_run": run_id,
                                    "weights": candidate.stack.share_of()},
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

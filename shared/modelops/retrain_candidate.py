"""The candidate of a retraining run: its training set (the base feature set plus the night's case photos),
its refitted identity member, the full fine-tune from the crops, and the holdout scores the guard compares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.config import Settings
from shared.db import session_scope
from shared.ml.members.identity import IdentityMember, build_ood_reference, combine, fit_identity_head
from shared.ml.train import heads as hd
from shared.ml.train.splits import in_holdout
from shared.modelops.crops import crop_keys, region_stack
from shared.storage import Storage, feature_set_key


@dataclass
class Dataset:
    """A run's photos as the heads see them: the base feature set's, then the night's case photos."""

    features: np.ndarray  # N x R x F
    labels: list[str]
    subjects: list[str]
    holdout: np.ndarray  # N bool
    identity: np.ndarray | None = None  # N x 128 identity descriptors (models with an identity member)


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


def aggregate_scores(region_probs: np.ndarray, member: IdentityMember | None,
                     descriptors: np.ndarray | None) -> np.ndarray:
    """A model's holdout scores: the regions' mean, combined with its identity member's scores."""
    if member is None:
        return combine(region_probs, None, 0.0)
    return combine(region_probs, member.head.probs(descriptors), member.weight)


def retrain_member(member: IdentityMember, data: Dataset, train_labels: np.ndarray, n_classes: int) -> IdentityMember:
    """The identity member refitted on the night's training photos: its head (kind chosen again on grouped
    folds) and OOD reference are new, its weight in the aggregate is the one chosen at training time."""
    train, hold = ~data.holdout, data.holdout
    head = fit_identity_head(data.identity[train], train_labels, n_classes, np.asarray(data.subjects)[train])
    ood = build_ood_reference(data.identity[train], data.identity[hold] if hold.any() else None)
    return IdentityMember(head, member.weight, ood, member.encoder_sha, member.validation, member.flip)


def fine_tune(model, init, classes: list[str], labels: np.ndarray, train_labels: np.ndarray, data: Dataset,
               cases: list[tuple[int, str, str]], crops_key: str, storage: Storage, settings: Settings,
               member: IdentityMember | None = None):
    """Fine-tune every layer (the paper's recipe: SGD 5e-3, momentum 0.9, augmentation) from the crops.

    Returns the candidate, both models' holdout probabilities, and the key of the base
    feature set recomputed under the candidate's new backbone.
    """
    from shared.ml.members.model import predict
    from shared.ml.runtime.device import resolve_device
    from shared.ml.train.data import Sample
    from shared.ml.train.loop import train_ensemble
    from shared.ml.train.prepared import PreparedData
    from shared.ml.train.recipe import TrainConfig

    base = hd.load_feature_set(storage.get(crops_key))
    regions = list(model.regions)
    with session_scope() as s:
        keys = crop_keys(s, [i for i, _, _ in cases])
    case_crops = [region_stack(storage, keys[i], regions) for i, _, _ in cases]
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

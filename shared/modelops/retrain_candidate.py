"""The candidate of a retraining run: its training set (the base feature set plus the night's case photos, or the
gallery's diagnosed photos alone for a clinic's first model), the members refitted on it, the full fine-tune of
CASIA-Nets from the crops, and the holdout scores the guard compares."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy.orm import Session

from shared.config import Settings
from shared.db import session_scope
from shared.ml.members.base import Passes
from shared.ml.members.identity import MEMBER
from shared.ml.members.model import GestaltModel, crop_of
from shared.ml.train import heads as hd
from shared.ml.train.refit import FeatureSet, aggregate_from_features, gallery_ranking
from shared.ml.train.splits import in_holdout, stratified_holdout
from shared.modelops.crops import crop_keys, region_stack
from shared.modelops.features import cached_vectors
from shared.storage import Storage, feature_set_key


@dataclass
class Dataset:
    """A run's photos as the members see them: the base feature set's, then the night's case photos."""

    features: FeatureSet
    labels: list[str]
    subjects: list[str]
    holdout: np.ndarray  # N bool

    def rows(self, mask: np.ndarray) -> FeatureSet:
        f = self.features
        return FeatureSet(None if f.features is None else f.features[mask],
                          None if f.identity is None else f.identity[mask], f.regions)


def case_vectors(session: Session, storage: Storage, model: GestaltModel, image_ids: list[int],
                 encode) -> tuple[dict[int, FeatureSet], int]:
    """Per diagnosed photo, the features its model's members read (cached ones, the missing ones computed from
    the stored crops and cached): the regional member's and the identity descriptor. A model without members (the
    gallery model) reads the encoder's descriptors of its descriptor space. Returns the photos that have all of
    them, and how many photos' vectors were computed."""
    regional = next((m for m in model.members if m.kind != MEMBER), None)
    identity = model.member(MEMBER)
    computed = 0
    parts: list[dict[int, np.ndarray]] = []
    for member in [m for m in (regional, identity) if m is not None]:
        vectors, n = cached_vectors(session, storage, member.feature_key, member.names, member.inputs,
                                    lambda crops, m=member: m.score(Passes(crops, encode)).features, image_ids)
        parts.append(vectors)
        computed += n
    if not model.members:  # the gallery model: its descriptors are what the first heads are fitted on
        regions = tuple(n for n in model.descriptor_names if n != MEMBER)
        region_vectors, n_regions = cached_vectors(
            session, storage, model.key_of(regions[0]) if regions else "", regions,
            tuple(crop_of(r) for r in regions),
            lambda crops: np.stack([Passes(crops, encode).features(crop_of(r), model.flip) for r in regions], 1),
            image_ids) if regions else ({}, 0)
        identity_vectors, n_identity = cached_vectors(
            session, storage, model.key_of(MEMBER), (MEMBER,), (crop_of(MEMBER),),
            lambda crops: Passes(crops, encode).descriptors(crop_of(MEMBER), model.flip)[:, None], image_ids)
        return {i: FeatureSet(region_vectors[i][None] if regions else None, identity_vectors[i], regions)
                for i in image_ids if i in identity_vectors and (not regions or i in region_vectors)}, \
            max(n_regions, n_identity)
    out = {}
    for image_id in image_ids:
        if all(image_id in p for p in parts):
            feats = parts[0][image_id][None] if regional is not None else None
            ident = parts[-1][image_id] if identity is not None else None
            out[image_id] = FeatureSet(feats, ident, tuple(regional.names) if regional is not None else ())
    return out, computed


def build_dataset(base: dict | None, cases: list[tuple[int, str, str]], feats: dict[int, FeatureSet],
                  holdout_fraction: float, regions: tuple[str, ...]) -> Dataset:
    """Base features plus case features; case subjects are held out by a stable hash. Without a base set (the
    gallery model's first model), the cases alone, with a held-out share of every syndrome's patients (the first
    model's split, kept in its base set)."""
    features = [feats[i].features for i, _, _ in cases]
    identity = [feats[i].identity for i, _, _ in cases]
    labels = [n for _, n, _ in cases]
    subjects = [s for _, _, s in cases]
    holdout = [in_holdout(s, holdout_fraction) for _, _, s in cases] if base is not None else \
        stratified_holdout(subjects, labels, holdout_fraction)
    if base is not None:
        features = [base["features"]] + features if "features" in base else features
        identity = [base["identity"]] + identity if "identity" in base else identity
        labels, subjects = base["labels"].tolist() + labels, base["subjects"].tolist() + subjects
        holdout = base["holdout"].tolist() + holdout
    has_features = any(f is not None for f in features)
    has_identity = any(i is not None for i in identity)
    return Dataset(FeatureSet(np.concatenate(features).astype(np.float32) if has_features else None,
                              np.concatenate(identity).astype(np.float32) if has_identity else None, regions),
                   labels, subjects, np.asarray(holdout, bool))


def holdout_scores(model: GestaltModel, data: Dataset, labels: np.ndarray) -> np.ndarray:
    """A model's aggregate on the holdout rows; for the gallery model (no member), the gallery's own ranking (the
    training rows as its patients), which is what a clinic saw before the first trained model."""
    hold = data.holdout
    if model.members:
        return aggregate_from_features(model, data.rows(hold))
    return gallery_ranking(data.features, model.gallery_names, labels, ~hold, np.flatnonzero(hold),
                           max(int(labels.max()) + 1, 1))


def fine_tune(model: GestaltModel, init, classes: list[str], labels: np.ndarray, train_labels: np.ndarray,
              data: Dataset, cases: list[tuple[int, str, str]], crops_key: str, storage: Storage, settings: Settings,
              candidate: GestaltModel):
    """Fine-tune every layer of the CASIA-Nets (the paper's recipe: SGD 5e-3, momentum 0.9, augmentation) from the
    crops; the other members are ``candidate``'s (refitted from features).

    Returns the candidate, both models' holdout probabilities, and the key of the base feature set recomputed
    under the candidate's new backbone.
    """
    from shared.ml.members.casia import CasiaRegions
    from shared.ml.runtime.device import resolve_device
    from shared.ml.train.data import Sample
    from shared.ml.train.loop import train_ensemble
    from shared.ml.train.prepared import PreparedData
    from shared.ml.train.recipe import TrainConfig

    base = hd.load_feature_set(storage.get(crops_key))
    net = model.member("casia").net
    regions = list(net.regions)
    with session_scope() as s:
        keys = crop_keys(s, [i for i, _, _ in cases])
    case_crops = [region_stack(storage, keys[i], regions) for i, _, _ in cases]
    crops = np.concatenate([base["crops"], np.stack(case_crops)]) if case_crops else base["crops"]
    prepared = PreparedData(crops=crops, labels=labels.copy(), samples=[
        Sample(Path(""), lab, subj) for lab, subj in zip(data.labels, data.subjects, strict=True)])
    train_idx = list(np.flatnonzero(~data.holdout))
    prepared.labels[train_idx] = train_labels
    cfg = TrainConfig(width=net.width, epochs=settings.retrain_full_epochs, lr=5e-3, optimizer="sgd",
                      device=str(resolve_device(settings.device)), progress=False)
    tuned, _ = train_ensemble(prepared, classes, net.regions, train_idx, [], cfg, init=init)
    candidate.members = [CasiaRegions(tuned.eval()) if m.kind == "casia" else m for m in candidate.members]
    hold = data.holdout
    n_base = len(base["labels"])
    all_features = hd.extract_features(tuned, crops)
    tuned_set = FeatureSet(all_features, data.features.identity, data.features.regions)
    tuned_data = Dataset(tuned_set, data.labels, data.subjects, data.holdout)
    cand_probs = aggregate_from_features(candidate, tuned_data.rows(hold))
    act_probs = aggregate_from_features(model, data.rows(hold))
    identity = data.features.identity[:n_base] if data.features.identity is not None else None
    blob = hd.save_feature_set(all_features[:n_base], base["labels"].tolist(), base["subjects"].tolist(),
                               base["holdout"], base["sha256"].tolist(), identity=identity)
    key = storage.put(feature_set_key(candidate.member("casia").feature_key, blob), blob)
    return candidate, cand_probs, act_probs, key

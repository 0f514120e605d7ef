"""Registering a freshly trained model: its version row and checkpoint, and its training set as the
base feature set (and crops) that nightly retraining starts from."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from shared.db import session_scope
from shared.ml.train.heads import extract_features, save_feature_set
from shared.modelops import registry
from shared.storage import Storage, feature_set_key, get_storage, train_data_key


@dataclass(frozen=True)
class Registered:
    id: int
    name: str
    status: str


def store_base_set(storage: Storage, model, data, val_idx: list[int]) -> dict[str, str]:
    """Store the training set as the features its regional member and its identity member are fitted on (and, for
    CASIA-Nets, as crops, for full fine-tunes), keyed by the regional member's feature key.

    Labels are stored as the model's class names (a catalogue ID such as OMIM:147920 becomes its
    syndrome's name), the names nightly retraining matches diagnoses by. Returns the version config keys.
    """
    from shared.ml.members.identity import MEMBER

    holdout = np.zeros(len(data.samples), bool)
    holdout[val_idx] = True
    with session_scope() as session:
        names = {raw: c["name"] for raw, c in zip(model.class_names,
                                                  registry.upsert_syndromes(session, model.class_names), strict=True)}
    meta = ([names.get(s.label, s.label) for s in data.samples], [s.subject for s in data.samples], holdout,
            [s.sha256 for s in data.samples])
    identity = data.descriptors.get(MEMBER) if model.member("identity") is not None else None
    casia, regional = model.member("casia"), model.member("encoder_regions")
    if casia is not None:
        features, key = extract_features(casia.net, data.crops), casia.feature_key
    elif regional is not None:
        features, key = np.stack([data.descriptors[r] for r in regional.regions], 1), regional.feature_key
    else:
        return {}
    blob = save_feature_set(features, *meta, identity=identity)
    config = {"base_features_key": storage.put(feature_set_key(key, blob), blob)}
    if casia is not None:
        crops = save_feature_set(np.zeros((0,)), *meta, crops=data.crops)
        config["base_crops_key"] = storage.put(train_data_key(crops), crops)
    return config


def register_trained(model, metrics: dict, name: str | None, activate: bool,
                     extra: dict | None = None, base_set=None) -> Registered:
    """Register (and maybe activate) a trained model; with ``base_set`` (prepared data, validation
    indices) also store its training set for nightly retraining. Waking the photos that wait for a
    model is the caller's (:func:`shared.dispatch.wake_waiting_photos`)."""
    storage = get_storage()
    config = store_base_set(storage, model, *base_set) if base_set is not None else {}
    with session_scope() as session:
        version = registry.register_model(session, storage, model, metrics, name=name, extra=extra, config=config)
        if activate:
            registry.activate(session, version)
        return Registered(version.id, version.name, version.status)

"""The ensemble's members together: the identity member fitted beside the regional networks, and
every member's scores side by side (what ``gestalt train``, ``gestalt evaluate`` and the tests use).

The pure parts (heads, weights, the OOD reference) are :mod:`shared.ml.members.identity`; this module adds
the encoder and the regional networks' predictions around them.
"""
from __future__ import annotations

import numpy as np

from shared.ml.members.model import predict
from shared.ml.nets.ensemble import RegionalEnsemble
from shared.ml.train.prepared import PreparedData

# The identity member's descriptors average each chip with its mirror image (shared.ml.nets.encoder.encode's
# flip): on the screening example (docs/examples/screening), new ORL people 0.93 -> 0.96, colour photos 1.00 both.
FLIP_DESCRIPTORS = True


def describe_faces(data: PreparedData, device: str = "cpu", flip: bool = FLIP_DESCRIPTORS) -> np.ndarray:
    """The identity encoder's descriptors of every face of ``data`` (computed once, kept on ``data``)."""
    from shared.ml.nets.encoder import encode, load_encoder

    if data.descriptors is None:
        if data.chips is None:
            raise ValueError("the prepared data has no face chips for the identity encoder")
        data.descriptors = encode(load_encoder(device), data.chips, flip=flip)
    return data.descriptors


def add_identity_member(model: RegionalEnsemble, data: PreparedData, train_idx: list[int], val_idx: list[int],
                        device: str = "cpu", seed: int = 0):
    """Fit the identity member on the training photos and set it on ``model`` (see
    :func:`shared.ml.members.identity.build_member`); its weight and OOD reference come from the validation photos."""
    from shared.ml.members.identity import build_member
    from shared.ml.nets.encoder import CONVERTED_SHA256

    descriptors = describe_faces(data, device, FLIP_DESCRIPTORS)
    region_val = predict(model, data.crops[val_idx]).region_probs if len(val_idx) else None
    model.identity = build_member(descriptors, data.labels, model.num_classes, train_idx, val_idx,
                                  [s.subject for s in data.samples], region_val, CONVERTED_SHA256, seed=seed,
                                  flip=FLIP_DESCRIPTORS)
    return model.identity


def member_probs(model: RegionalEnsemble, crops: np.ndarray,
                 descriptors: np.ndarray | None) -> tuple[list[str], np.ndarray, list[float]]:
    """Each member's scores (``N x M x C``: regions, then the identity member if the model has one and
    ``descriptors`` are given), the member names and their weights in the aggregate."""
    from shared.ml.members.identity import member_scores

    pred = predict(model, crops, descriptors=descriptors)
    weight = model.identity.weight if model.identity is not None else 0.0
    return member_scores(model.regions, pred.region_probs, pred.identity_probs, weight)

"""A model's prediction: every member's scores for a batch of faces and their aggregate."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.ml.nets.ensemble import RegionalEnsemble, crops_to_tensor
from shared.ml.runtime.device import autocast_context


@dataclass
class Prediction:
    region_probs: np.ndarray  # N x R x C
    aggregate: np.ndarray  # N x C: the regions' mean, combined with the identity member's when there is one
    features: np.ndarray  # N x R x F
    identity_probs: np.ndarray | None = None  # N x C, the identity member's scores
    # per face, how unlike the training photos (see shared.ml.members.identity.OODReference)
    ood: list[dict] | None = None


@torch.inference_mode()
def predict(model: RegionalEnsemble, crops: np.ndarray, batch_size: int = 256, flip_tta: bool = False,
            precision: str = "auto", descriptors: np.ndarray | None = None) -> Prediction:
    """Scores for many faces at once: all regions of ``batch_size`` faces per step.

    Args:
        model: the ensemble, on its device (see :func:`prepare_for_inference`).
        crops: ``N x R x 100 x 100`` uint8, regions in ``model.regions`` order.
        batch_size: faces per forward pass.
        flip_tta: average each region's softmax over the crop and its horizontal flip (the features
            stay those of the crop as given, the ones region heads and the gallery are built on).
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 on CUDA, fp32 elsewhere).
        descriptors: ``N x 128`` face-identity descriptors of the same faces
            (:func:`shared.ml.nets.encoder.encode` of their face chips); a model with an identity member
            then scores them and combines that member with the regions. None: regions only.
    """
    device = next(model.parameters()).device
    forward = getattr(model, "compiled", None) or model.forward_with_features
    runner = getattr(model, "runner", None)  # another runtime than torch (prepare_for_inference's runtime)
    probs, feats = [], []
    for start in range(0, len(crops), batch_size):
        x = crops_to_tensor(crops[start:start + batch_size]).to(device, non_blocking=True)
        n = len(x)
        if flip_tta:  # one pass over crops and mirrors: twice the batch, one launch per layer
            x = torch.cat([x, x.flip(-1)])
        if runner is not None:
            logits, f = (torch.from_numpy(out) for out in runner(x))
        else:
            with autocast_context(device, precision):
                logits, f = forward(x)
        p = torch.softmax(logits.float(), dim=-1)
        if flip_tta:
            p = (p[:n] + p[n:]) / 2
            f = f[:n]
        probs.append(p.cpu())
        feats.append(f.float().cpu())
    if not probs:
        c, r = model.num_classes, len(model.regions)
        empty = np.zeros((0, r, c), np.float32)
        return Prediction(empty, np.zeros((0, c), np.float32), np.zeros((0, r, 0), np.float32))
    region_probs = torch.cat(probs).numpy()
    pred = Prediction(region_probs=region_probs, aggregate=region_probs.mean(axis=1),
                      features=torch.cat(feats).numpy())
    member = getattr(model, "identity", None)
    if member is not None and descriptors is not None:
        from shared.ml.members.identity import combine

        pred.identity_probs = member.head.probs(descriptors)
        pred.aggregate = combine(region_probs, pred.identity_probs, member.weight).astype(np.float32)
        pred.ood = member.ood.score(descriptors) if member.ood is not None else None
    return pred

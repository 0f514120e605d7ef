"""Regional heads on cached backbone features: the cheap path of nightly retraining.

A model's backbone (everything before each region's final layer) is identified by
``backbone_sha``. Features computed under one backbone stay valid for every model
that shares it, so a night only computes features for images it has not seen and
then trains one linear softmax head per region. Cost grows with the number of
images times a fixed number of epochs, never with the history of runs.
"""
from __future__ import annotations

import copy
import io
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.ml.evaluate import statistics as ev
from shared.ml.nets.ensemble import RegionalEnsemble, crops_to_tensor

logger = logging.getLogger(__name__)


@torch.inference_mode()
def extract_features(model: RegionalEnsemble, crops: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Pooled features ``N x R x F`` (float32) for crops ``N x R x 100 x 100``."""
    model.eval()
    out = []
    for start in range(0, len(crops), batch_size):
        x = crops_to_tensor(crops[start:start + batch_size])
        out.append(torch.stack([model.nets[r].forward_features(x[:, i]) for i, r in enumerate(model.regions)], 1))
    return torch.cat(out).float().numpy() if out else np.zeros((0, len(model.regions), 0), np.float32)


@dataclass
class HeadConfig:
    epochs: int = 30
    # Small sets get at least this many optimiser steps (large sets are bound by `epochs`).
    min_steps: int = 300
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0
    threads: int = 0  # 0: torch default
    # Regularisation: soft targets, and dropout on the standardised features (training only).
    # Dropout 0.5 lifts 5-fold per-image top-1 on the GMDB features from 0.780 to 0.787 (`gestalt heads-benchmark`).
    label_smoothing: float = 0.0
    input_dropout: float = 0.5


@dataclass
class Heads:
    """One linear softmax layer per region, already folded with the feature standardisation."""

    weights: np.ndarray  # R x C x F
    biases: np.ndarray  # R x C

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``N x R x C`` from features ``N x R x F``."""
        return np.einsum("nrf,rcf->nrc", features, self.weights) + self.biases[None]

    def probs(self, features: np.ndarray) -> np.ndarray:
        z = self.logits(features)
        z -= z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(axis=-1, keepdims=True)


def train_heads(features: np.ndarray, labels: np.ndarray, n_classes: int, cfg: HeadConfig | None = None) -> Heads:
    """Fit one class-weighted softmax layer per region on standardised features.

    Args:
        features: ``N x R x F`` float32.
        labels: ``N`` class indices in ``[0, n_classes)``.
        n_classes: outputs per head (classes without examples get a very low bias).
        cfg: optimisation settings; the cost is ``epochs * N * R * F * C``.
    """
    cfg = cfg or HeadConfig()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    x = torch.as_tensor(features, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    n, n_regions, dim = x.shape
    mean = x.mean(0)
    std = x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    counts = torch.bincount(y, minlength=n_classes).float()
    class_weight = torch.where(counts > 0, counts.sum() / counts.clamp_min(1) / max(1, int((counts > 0).sum())),
                               torch.zeros_like(counts))
    # R independent heads as one batched layer: weight R x C x F.
    weight = nn.Parameter(torch.zeros(n_regions, n_classes, dim))
    bias = nn.Parameter(torch.zeros(n_regions, n_classes))
    optimizer = torch.optim.AdamW([weight, bias], lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, int(np.ceil(n / cfg.batch_size)))
    epochs = max(cfg.epochs, int(np.ceil(cfg.min_steps / steps_per_epoch)))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(cfg.seed)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight, label_smoothing=cfg.label_smoothing)
    dropout = nn.Dropout(cfg.input_dropout)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            xb = dropout(xs[idx])  # B x R x F
            logits = torch.einsum("brf,rcf->brc", xb, weight) + bias
            loss = loss_fn(logits.reshape(-1, n_classes), y[idx].repeat_interleave(n_regions))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    with torch.no_grad():
        w = weight / std.unsqueeze(1)  # fold the standardisation into the layer
        b = bias - (w * mean.unsqueeze(1)).sum(-1)
        absent = counts == 0
        b[:, absent] = -1e4  # a class with no example is never ranked above a trained one
    return Heads(w.numpy(), b.numpy())


def with_heads(base: RegionalEnsemble, heads: Heads) -> RegionalEnsemble:
    """A copy of ``base`` (same backbone) whose final layers are ``heads`` (possibly more classes)."""
    model = copy.deepcopy(base)
    n_classes = heads.weights.shape[1]
    model.num_classes = n_classes
    for i, region in enumerate(model.regions):
        net = model.nets[region]
        net.reset_classifier(n_classes)
        with torch.no_grad():
            net.fc.weight.copy_(torch.as_tensor(heads.weights[i]))
            net.fc.bias.copy_(torch.as_tensor(heads.biases[i]))
    return model.eval()


def heads_of(model: RegionalEnsemble) -> Heads:
    """The final layers of a model as :class:`Heads`."""
    w = np.stack([model.nets[r].fc.weight.detach().cpu().numpy() for r in model.regions])
    b = np.stack([model.nets[r].fc.bias.detach().cpu().numpy() for r in model.regions])
    return Heads(w, b)


@dataclass
class GuardResult:
    promote: bool
    reason: str
    candidate: dict
    active: dict


def holdout_metrics(probs: np.ndarray, labels: np.ndarray, resamples: int = 1000) -> dict:
    """Per-image and macro top-1/5/10 with CIs, and per-class top-1 recall (labels < 0: class unknown)."""
    known = labels >= 0
    # Unknown labels can never be hit: map them to an extra column that no model scores.
    padded = np.concatenate([probs, np.full((len(probs), 1), -np.inf)], axis=1)
    lab = np.where(known, labels, probs.shape[1])
    table = ev.topk_table(padded, lab, (1, 5, 10), resamples=resamples)
    top1, top10 = ev.topk_hits(padded, lab, 1), ev.topk_hits(padded, lab, 10)
    classes = np.unique(lab)
    return {"per_image": {k: v.as_dict() for k, v in table["per_image"].items()},
            "macro": {k: v.as_dict() for k, v in table["macro"].items()},
            "recall": {int(c): float(top1[lab == c].mean()) for c in classes},
            "recall10": {int(c): float(top10[lab == c].mean()) for c in classes}, "n": int(len(labels))}


def promotion_guard(candidate_probs: np.ndarray, active_probs: np.ndarray | None, candidate_labels: np.ndarray,
                    active_labels: np.ndarray, class_names: list[str], tolerance: float = 0.02) -> GuardResult:
    """Promote only if top-1 and top-10 are not worse beyond ``tolerance`` and no class collapses.

    A class collapses when the active model recognised some of its holdout patients (top-1
    recall above zero) and the candidate no longer ranks it in the top 10 for any of them.
    (Top-1 recall alone flips on a single image when a class has one or two holdout patients.)

    Both models are scored on the same holdout images; ``active_labels`` holds -1 where
    the active model lacks the true class (a miss for it). ``class_names`` are the
    candidate's classes; the active model's classes are a prefix of them.
    """
    cand = holdout_metrics(candidate_probs, candidate_labels)
    if active_probs is None:
        return GuardResult(True, "no active model to compare with", cand, {})
    act = holdout_metrics(active_probs, active_labels)
    reasons = []
    for k in ("top1", "top10"):
        c, a = cand["per_image"][k]["value"], act["per_image"][k]["value"]
        if c < a - tolerance:
            reasons.append(f"{k} fell from {a:.3f} to {c:.3f} (tolerance {tolerance:.3f})")
    collapsed = [class_names[c] for c, r in act["recall"].items()
                 if c < len(class_names) and r > 0 and cand["recall10"].get(c, 0.0) == 0.0]
    if collapsed:
        reasons.append(f"classes collapsed to zero recall: {', '.join(collapsed[:10])}")
    if reasons:
        return GuardResult(False, "; ".join(reasons), cand, act)
    c1, a1 = cand["per_image"]["top1"]["value"], act["per_image"]["top1"]["value"]
    return GuardResult(True, f"top-1 {a1:.3f} -> {c1:.3f}; top-10 {act['per_image']['top10']['value']:.3f} -> "
                             f"{cand['per_image']['top10']['value']:.3f}", cand, act)


def save_feature_set(features: np.ndarray, labels: list[str], subjects: list[str], holdout: np.ndarray,
                     sha256: list[str], crops: np.ndarray | None = None, identity: np.ndarray | None = None) -> bytes:
    """A base training set (npz bytes): features, what nightly head runs start from, or, with
    ``crops``, the uint8 region crops that a full fine-tune starts from; ``identity`` adds the identity
    encoder's descriptors (``N x 128``) that the identity member's head is retrained from."""
    buf = io.BytesIO()
    arrays = {"features": features.astype(np.float32)} if crops is None else {"crops": crops.astype(np.uint8)}
    if identity is not None:
        arrays["identity"] = np.asarray(identity, np.float32)
    np.savez_compressed(buf, labels=np.asarray(labels), subjects=np.asarray(subjects),
                        holdout=np.asarray(holdout, bool), sha256=np.asarray(sha256), **arrays)
    return buf.getvalue()


def load_feature_set(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# ----- benchmark on features ------------------------------------------------------------------

def _topk_metrics(scores: np.ndarray, labels: np.ndarray) -> dict:
    top1, top5 = ev.topk_hits(scores, labels, 1), ev.topk_hits(scores, labels, 5)
    macro = float(np.mean([top1[labels == c].mean() for c in np.unique(labels)]))
    return {"top1": float(top1.mean()), "top5": float(top5.mean()), "macro_top1": macro}


def benchmark_heads(features: np.ndarray, labels: np.ndarray, subjects: np.ndarray, n_classes: int,
                    folds: int = 5, cfg: HeadConfig | None = None) -> dict[str, dict]:
    """Out-of-fold per-image metrics of our heads, gallery matching and two scikit-learn baselines.

    Folds are subject-disjoint (``GroupKFold`` by subject), so no patient is in both a training
    fold and its test fold. Methods, all on the same folds:

    * ``heads``: :func:`train_heads` (one class-weighted softmax layer per region, regions averaged);
    * ``gallery``: each class scored by its nearest training patient (cosine, :mod:`shared.ml.members.gallery`);
    * ``logistic_regression``: standardised, C=0.1, balanced class weights;
    * ``nearest_centroid``: cosine to the mean of each class's normalised features.

    Args:
        features: ``N x R x F`` (or ``N x F``) float32.
        labels: ``N`` class indices; subjects: ``N`` patient IDs.
    Returns: ``{method: {"top1", "top5", "macro_top1"}}``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler, normalize

    from shared.ml.members.gallery import gallery_scores

    x = np.asarray(features, dtype=np.float32)
    x = x[:, None, :] if x.ndim == 2 else x
    flat = x.reshape(len(x), -1)
    y = np.asarray(labels)
    scores = {m: np.full((len(y), n_classes), -np.inf) for m in
              ("heads", "gallery", "logistic_regression", "nearest_centroid")}
    for train, test in GroupKFold(n_splits=folds).split(flat, y, groups=subjects):
        scores["heads"][test] = train_heads(x[train], y[train], n_classes, cfg).probs(x[test]).mean(axis=1)
        scores["gallery"][test] = gallery_scores(x[train], y[train], x[test], n_classes)
        lr = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))
        lr.fit(flat[train], y[train])
        scores["logistic_regression"][np.ix_(test, lr[-1].classes_)] = lr.predict_proba(flat[test])
        unit = normalize(flat)
        present = np.unique(y[train])
        centroids = normalize(np.stack([unit[train][y[train] == c].mean(0) for c in present]))
        scores["nearest_centroid"][np.ix_(test, present)] = unit[test] @ centroids.T
    return {m: _topk_metrics(s, y) for m, s in scores.items()}


def benchmark_members(features: np.ndarray, identity: np.ndarray, labels: np.ndarray, subjects: np.ndarray,
                      n_classes: int, regions: list[str], folds: int = 5, cfg: HeadConfig | None = None,
                      encoder_regions: bool = False) -> dict:
    """Out-of-fold per-image metrics of every member of a model and of their stack, on the same subject-disjoint folds.

    Each region's head (a head of the identity member's kind on the encoder's region descriptors when
    ``encoder_regions``, else :func:`train_heads` on CASIA-Net features), the regions' mean, the identity member's
    head (:func:`shared.ml.members.identity.fit_identity_head`, its kind chosen inside each training fold), and the
    aggregate: for each fold, a stack (:func:`shared.ml.members.stack.fit_stack`) fitted on the other folds'
    out-of-fold member scores, applied to this fold's, so no photo is scored by weights fitted on it.

    Returns: ``{"members": {name: metrics}, "aggregate": metrics, "weights": {name: share}}`` (the weights of a stack
    fitted on every out-of-fold score).
    """
    from sklearn.model_selection import GroupKFold

    from shared.ml.members.identity import MEMBER, fit_identity_head
    from shared.ml.members.stack import fit_stack

    x = np.asarray(features, np.float32)
    d = np.asarray(identity, np.float32)
    y, groups = np.asarray(labels), np.asarray(subjects)
    names = (*regions, MEMBER)
    oof = np.zeros((len(y), len(names), n_classes), np.float32)
    splits = list(GroupKFold(n_splits=folds).split(d, y, groups=groups))
    for train, test in splits:
        if encoder_regions:
            for i in range(len(regions)):
                oof[test, i] = fit_identity_head(x[train, i], y[train], n_classes, groups[train]).probs(x[test, i])
        else:
            oof[test, :len(regions)] = train_heads(x[train], y[train], n_classes, cfg).probs(x[test])
        oof[test, -1] = fit_identity_head(d[train], y[train], n_classes, groups[train]).probs(d[test])
    aggregate = np.zeros((len(y), n_classes), np.float32)
    for train, test in splits:
        aggregate[test] = fit_stack(oof[train], y[train], names).combine(oof[test])
    members = {n: _topk_metrics(oof[:, i], y) for i, n in enumerate(names)}
    members["regions (mean)"] = _topk_metrics(oof[:, :len(regions)].mean(1), y)
    return {"members": members, "aggregate": _topk_metrics(aggregate, y),
            "weights": fit_stack(oof, y, names, "every out-of-fold score").share_of()}

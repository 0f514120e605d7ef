"""The identity member of the ensemble: heads on the face-identity encoder's descriptors.

The encoder (:mod:`shared.ml.nets.encoder`, dlib's ResNet trained on about 3 million faces) is frozen;
what learns syndromes is a head on its 128-d descriptor, chosen per model on subject-grouped
folds of the training photos between a linear softmax and a softmax on an RBF kernel map
(Nystroem), the non-linear head that an RBF SVM on the same descriptors approximates, each a
class-balanced logistic regression (scikit-learn, L-BFGS) at one of two strengths. Heads are
plain arrays (safe to keep in a checkpoint, cheap to retrain nightly).

The same heads serve the encoder's regional members (:mod:`shared.ml.members.encoder_regions`).
Also here: the out-of-distribution score of a photo (how far its descriptors lie from the training
photos', as a percentile among held-out training photos).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from shared.ml.members.base import Member, Passes, Scores

MEMBER = "identity"
# The stored crop the member reads: dlib's 150 x 150 RGB face chip (shared.ml.preprocess.facechip).
CHIP_REGION = "face_chip"
# Candidate heads tried on grouped folds: (kind, gamma x descriptor dimension, inverse regularisation C).
CANDIDATES: tuple[tuple[str, float, float], ...] = (
    ("linear", 0.0, 0.1), ("linear", 0.0, 1.0), ("rbf", 0.5, 1.0), ("rbf", 0.5, 10.0), ("rbf", 1.0, 1.0),
    ("rbf", 1.0, 10.0))
MAX_COMPONENTS = 1024
SELECTION_FOLDS = 3
OOD_NEIGHBOURS = 5
OOD_MAX_REFERENCE = 5000
OOD_FLAG_PERCENTILE = 99.0


@dataclass
class IdentityHead:
    """Standardise -> (optional) RBF kernel map onto ``components`` -> softmax layer."""

    kind: str  # "linear" or "rbf"
    mean: np.ndarray  # D
    std: np.ndarray  # D
    weight: np.ndarray  # C x M
    bias: np.ndarray  # C
    gamma: float = 0.0
    components: np.ndarray | None = None  # M x D, standardised descriptors
    normalization: np.ndarray | None = None  # M x M (Nystroem's K_mm^-1/2)
    selection: dict = field(default_factory=dict)  # the folds' scores per candidate
    # The chosen candidate's out-of-fold probabilities on the photos it was fitted on (N x C; not saved): what a
    # stack of members is fitted on. None when there were too few subjects for folds.
    oof: np.ndarray | None = field(default=None, repr=False)

    def transform(self, descriptors: np.ndarray) -> np.ndarray:
        x = (np.asarray(descriptors, np.float32) - self.mean) / self.std
        if self.kind == "linear":
            return x
        return _kernel_map(x, self.components, self.normalization, self.gamma)

    def probs(self, descriptors: np.ndarray) -> np.ndarray:
        """``N x C`` class probabilities for descriptors ``N x D``."""
        z = self.transform(descriptors) @ self.weight.T + self.bias
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])

    def state(self) -> dict:
        """Plain values and float32 arrays (what a checkpoint keeps; loads with ``weights_only``)."""
        import torch

        arrays = {"mean": self.mean, "std": self.std, "weight": self.weight, "bias": self.bias}
        if self.kind == "rbf":
            arrays.update(components=self.components, normalization=self.normalization)
        return {"kind": self.kind, "gamma": float(self.gamma), "selection": self.selection,
                **{k: torch.as_tensor(np.asarray(v, np.float32)) for k, v in arrays.items()}}

    @classmethod
    def from_state(cls, state: dict) -> IdentityHead:
        def arr(key: str) -> np.ndarray | None:
            return None if key not in state else np.asarray(state[key], np.float32)

        return cls(state["kind"], arr("mean"), arr("std"), arr("weight"), arr("bias"), float(state["gamma"]),
                   arr("components"), arr("normalization"), dict(state.get("selection") or {}))


def _kernel_map(x: np.ndarray, components: np.ndarray, normalization: np.ndarray, gamma: float) -> np.ndarray:
    sq = (x * x).sum(1)[:, None] + (components * components).sum(1)[None] - 2.0 * x @ components.T
    return (np.exp(-gamma * np.maximum(sq, 0.0)) @ normalization.T).astype(np.float32)


def _fit(descriptors: np.ndarray, labels: np.ndarray, n_classes: int, kind: str, gamma_scale: float,
         c: float, seed: int) -> IdentityHead:
    """One candidate: class-balanced multinomial logistic regression (L-BFGS) on the mapped descriptors."""
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(descriptors, np.float32)
    mean, std = x.mean(0), np.maximum(x.std(0), 1e-6)
    xs = (x - mean) / std
    gamma, components, normalization = 0.0, None, None
    if kind == "rbf":
        from sklearn.kernel_approximation import Nystroem

        gamma = gamma_scale / x.shape[1]
        mapper = Nystroem(gamma=gamma, n_components=min(len(xs), MAX_COMPONENTS), random_state=seed).fit(xs)
        components = mapper.components_.astype(np.float32)
        normalization = mapper.normalization_.astype(np.float32)
        xs = _kernel_map(xs, components, normalization, gamma)
    # Classes without a training photo get a bias that never ranks them above a trained one.
    weight = np.zeros((n_classes, xs.shape[1]), np.float32)
    bias = np.full(n_classes, -1e4, np.float32)
    present = np.unique(labels).astype(int)
    if len(present) == 1:  # one class only: it is always first
        bias[present[0]] = 0.0
        return IdentityHead(kind, mean, std, weight, bias, gamma, components, normalization, {"C": c})
    fit = LogisticRegression(C=c, class_weight="balanced", max_iter=1000).fit(xs, labels)
    present = fit.classes_.astype(int)
    if len(present) == 2:  # scikit-learn keeps one row for two classes: logit(p1) = w.x + b
        weight[present[1]], bias[present[1]] = fit.coef_[0] / 2, fit.intercept_[0] / 2
        weight[present[0]], bias[present[0]] = -fit.coef_[0] / 2, -fit.intercept_[0] / 2
    else:
        weight[present], bias[present] = fit.coef_, fit.intercept_
    return IdentityHead(kind, mean, std, weight, bias, gamma, components, normalization,
                        {"C": c})


def _macro_top1(probs: np.ndarray, labels: np.ndarray) -> float:
    hit = probs.argmax(1) == labels
    return float(np.mean([hit[labels == c].mean() for c in np.unique(labels)]))


def _log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-7, 1.0)).mean())


def fit_identity_head(descriptors: np.ndarray, labels: np.ndarray, n_classes: int,
                      subjects: np.ndarray | list | None = None, seed: int = 0,
                      candidates: tuple[tuple[str, float, float], ...] = CANDIDATES) -> IdentityHead:
    """The best of ``candidates`` (:data:`CANDIDATES`) on subject-grouped folds, refitted on every photo.

    Candidates are ranked by macro top-1 on the folds (log-loss breaks ties); with too few
    subjects for folds, the linear head is used.

    Args:
        descriptors: ``N x D`` encoder descriptors; labels: ``N`` class indices.
        subjects: ``N`` patient IDs (folds never split a patient); None: every photo its own.
    """
    from sklearn.model_selection import GroupKFold

    x = np.asarray(descriptors, np.float32)
    y = np.asarray(labels, np.int64)
    groups = np.asarray(subjects if subjects is not None else np.arange(len(y)))
    scores: dict[str, dict] = {}
    oof_of: dict[str, np.ndarray] = {}
    if len(np.unique(groups)) >= SELECTION_FOLDS and len(np.unique(y)) > 1:
        folds = list(GroupKFold(n_splits=SELECTION_FOLDS).split(x, y, groups))
        for kind, scale, c in candidates:
            oof = np.zeros((len(y), n_classes), np.float32)
            for train, test in folds:
                oof[test] = _fit(x[train], y[train], n_classes, kind, scale, c, seed).probs(x[test])
            oof_of[_name(kind, scale, c)] = oof
            scores[_name(kind, scale, c)] = {"macro_top1": _macro_top1(oof, y), "log_loss": _log_loss(oof, y),
                                             "kind": kind, "gamma_scale": scale, "C": c}
        best = max(scores.values(), key=lambda s: (round(s["macro_top1"], 6), -s["log_loss"]))
        kind, scale, c = best["kind"], best["gamma_scale"], best["C"]
    else:
        kind, scale, c = "linear", 0.0, 0.1
    head = _fit(x, y, n_classes, kind, scale, c, seed)
    head.oof = oof_of.get(_name(kind, scale, c))
    head.selection = {"chosen": _name(kind, scale, c), "folds": SELECTION_FOLDS if scores else 0,
                      "candidates": {k: {m: v[m] for m in ("macro_top1", "log_loss")} for k, v in scores.items()}}
    return head


def _name(kind: str, scale: float, c: float) -> str:
    return f"linear (C {c:g})" if kind == "linear" else f"rbf (gamma {scale:g}/d, C {c:g})"


# --- out of distribution ------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


@dataclass
class OODReference:
    """How unusual a descriptor is next to the training photos.

    ``distance`` is the mean cosine distance to the ``k`` nearest training descriptors;
    ``percentile`` places it among the same distance of held-out photos of the training
    collection (photos no head was fitted on). A photo above :data:`OOD_FLAG_PERCENTILE`
    is unlike the photos the model learned from.
    """

    train: np.ndarray  # M x D unit descriptors
    reference: np.ndarray  # sorted distances of held-out photos
    k: int = OOD_NEIGHBOURS
    flag_percentile: float = OOD_FLAG_PERCENTILE

    def distances(self, descriptors: np.ndarray, exclude_self: bool = False) -> np.ndarray:
        sims = _unit(descriptors) @ self.train.T
        k = min(self.k + int(exclude_self), sims.shape[1])
        nearest = -np.sort(-sims, axis=1)[:, int(exclude_self):k]
        return (1.0 - nearest).mean(axis=1)

    def score(self, descriptors: np.ndarray) -> list[dict]:
        """Per photo: ``{"distance", "percentile", "unusual"}``."""
        d = self.distances(descriptors)
        pct = 100.0 * np.searchsorted(self.reference, d, side="right") / max(len(self.reference), 1)
        return [{"distance": round(float(a), 4), "percentile": round(float(p), 1),
                 "unusual": bool(p >= self.flag_percentile)} for a, p in zip(d, pct, strict=True)]

    def state(self) -> dict:
        import torch

        return {"train": torch.as_tensor(self.train), "reference": torch.as_tensor(self.reference),
                "k": int(self.k), "flag_percentile": float(self.flag_percentile)}

    @classmethod
    def from_state(cls, state: dict) -> OODReference:
        return cls(np.asarray(state["train"], np.float32), np.asarray(state["reference"], np.float32),
                   int(state["k"]), float(state["flag_percentile"]))


def build_ood_reference(train_descriptors: np.ndarray, held_out_descriptors: np.ndarray | None = None,
                        seed: int = 0) -> OODReference | None:
    """The reference of a model trained on ``train_descriptors``.

    ``held_out_descriptors`` (validation photos) give the reference distances; without them each
    training photo's distance to the others (itself left out) is used. None when there are too few
    photos for a reference (fewer than two, or no held-out photo and fewer than ``k + 1``).
    """
    held = held_out_descriptors is not None and len(held_out_descriptors) > 0
    if len(train_descriptors) < 2 or (not held and len(train_descriptors) <= OOD_NEIGHBOURS):
        return None
    train = _unit(train_descriptors)
    if len(train) > OOD_MAX_REFERENCE:
        train = train[np.random.default_rng(seed).choice(len(train), OOD_MAX_REFERENCE, replace=False)]
    ref = OODReference(train, np.zeros(0, np.float32))
    reference = ref.distances(held_out_descriptors) if held else ref.distances(train, exclude_self=True)
    ref.reference = np.sort(reference).astype(np.float32)
    return ref


def descriptor_key(encoder_sha: str, flip: bool) -> str:
    """Where descriptors of one encoder are cached (``image_features.backbone_sha``): one key per encoder and flip.
    Every member that reads crops through the frozen encoder caches its descriptors under this key, one row per
    crop it reads (``identity`` for the face chip, the region's name for a region cut)."""
    if not flip:
        return encoder_sha
    import hashlib

    return hashlib.sha256(f"{encoder_sha}:flip-average".encode()).hexdigest()


def features_key(encoder_sha: str, flip: bool) -> str:
    """Where the encoder's stage features of region cuts are cached (one key per encoder and flip; one row per
    region), beside its identity descriptors (:func:`descriptor_key`)."""
    import hashlib

    return hashlib.sha256(f"{encoder_sha}:{'flip-average' if flip else 'plain'}:stage-256".encode()).hexdigest()


@dataclass
class IdentityMember(Member):
    """The identity member: a head on the frozen encoder's descriptor of dlib's face chip."""

    kind: ClassVar[str] = "identity"
    head: IdentityHead
    encoder_sha: str = ""
    validation: dict = field(default_factory=dict)
    # Descriptors are the mean of the chip's and its mirror image's (shared.ml.nets.encoder.encode's flip).
    flip: bool = False

    @property
    def names(self) -> tuple[str, ...]:
        return (MEMBER,)

    @property
    def inputs(self) -> tuple[str, ...]:
        return (CHIP_REGION,)

    @property
    def encoder_inputs(self) -> list[tuple[str, bool]]:
        return [(CHIP_REGION, self.flip)]

    @property
    def feature_key(self) -> str:
        return descriptor_key(self.encoder_sha, self.flip)

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def score(self, passes: Passes) -> Scores:
        d = passes.descriptors(CHIP_REGION, self.flip)
        return Scores(self.names, self.head.probs(d)[:, None], d[:, None], self.feature_key)

    def state(self) -> dict:
        return {"head": self.head.state(), "encoder_sha": self.encoder_sha, "validation": self.validation,
                "flip": bool(self.flip)}

    @classmethod
    def from_state(cls, state: dict) -> IdentityMember:
        return cls(IdentityHead.from_state(state["head"]), state.get("encoder_sha", ""),
                   dict(state.get("validation") or {}), bool(state.get("flip", False)))

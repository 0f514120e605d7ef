"""A model: its classes, its members, how they combine, and the preprocessing contract its members were fitted on.

:func:`predict` is the one orchestrator: it runs the shared encoder pass over every crop any member reads through
the encoder (one batch), then each member's :meth:`~shared.ml.members.base.Member.score`, then the stack. The
workers, ``gestalt train``/``evaluate`` and retraining all score through it; none of them special-cases a member.

A model with no trained member (:func:`gallery_model`) still computes the encoder's descriptors of every face
(what the gallery matches on and the day-one ranking is built from) and ranks nothing itself.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.ml.members.base import Member, Passes, Scores
from shared.ml.members.gallery import unit_concat
from shared.ml.members.identity import MEMBER, OODReference, descriptor_key, features_key
from shared.ml.members.stack import Stack
from shared.ml.preprocess.regions import cut_name

# What regional members are built on: the identity encoder (default), the paper's CASIA-Nets, or nothing
# (a gallery-only model).
ENCODER, CASIA, NONE = "encoder", "casia", "none"


def preprocessing_contract() -> dict:
    """What a model's members expect of the stored crops: the aligned canvas, the region boxes on it, the crop and
    cut sizes, and dlib's face chip. Saved in every checkpoint and version config, as torchvision's ``Weights``
    carry their transforms, so that readers (the case page, heatmaps) take boxes from the model, not the code."""
    from shared.ml.preprocess.alignment import CANVAS, TEMPLATE
    from shared.ml.preprocess.facechip import CHIP_SIZE, PADDING
    from shared.ml.preprocess.regions import CROP_SIZE, CUT_SIZE, DEFAULT_REGIONS, REGIONS

    return {"canvas": CANVAS, "template": TEMPLATE.tolist(), "regions": {k: list(v) for k, v in REGIONS.items()},
            "default_regions": list(DEFAULT_REGIONS), "crop_size": CROP_SIZE, "cut_size": CUT_SIZE,
            "chip": {"size": CHIP_SIZE, "padding": PADDING}}


@dataclass
class GestaltModel:
    """Members, their stack, the out-of-distribution reference and the gallery's descriptor space."""

    class_names: list[str]
    members: list[Member]
    stack: Stack
    backbone: str = ENCODER
    ood: OODReference | None = None
    # What the encoder gives of every face and is kept: "identity" (the face chip's identity descriptor) and a region's
    # name (its cut's stage features), each under its cache key (key_of): what the gallery, the OOD reference and a
    # later refit of encoder heads read.
    descriptor_names: tuple[str, ...] = (MEMBER,)
    encoder_sha: str = ""
    flip: bool = True
    contract: dict = field(default_factory=preprocessing_contract)
    # The descriptors the gallery and the OOD reference match on (chosen on validation; a subset of the above).
    gallery_names: tuple[str, ...] = (MEMBER,)

    def __post_init__(self) -> None:
        missing = [n for n in self.names if n not in self.stack.names]
        if missing:
            raise ValueError(f"the stack has no weight for member(s) {', '.join(missing)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def names(self) -> tuple[str, ...]:
        """Every score name, members in order (a regional member's regions, then ``identity``)."""
        return tuple(n for m in self.members for n in m.names)

    @property
    def regions(self) -> tuple[str, ...]:
        """The regions of the regional member (empty without one)."""
        return next((tuple(m.regions) for m in self.members if hasattr(m, "regions")), ())

    def member(self, kind: str) -> Member | None:
        return next((m for m in self.members if m.kind == kind), None)

    @property
    def needs_encoder(self) -> bool:
        """Whether scoring runs the identity encoder (a member reads through it, or the model keeps descriptors)."""
        return bool(self.encoder_sha) or any(m.encoder_inputs for m in self.members)

    def key_of(self, name: str) -> str:
        """Where the encoder's output ``name`` (a descriptor name) is cached in the feature store."""
        if not self.encoder_sha:
            return ""
        return descriptor_key(self.encoder_sha, self.flip) if name == MEMBER else features_key(self.encoder_sha,
                                                                                                self.flip)

    @property
    def descriptor_key(self) -> str:
        """Where the face chip's identity descriptor is cached ("" without the encoder)."""
        return self.key_of(MEMBER)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Every stored crop a scoring pass reads: the members' and the descriptors'."""
        names = [i for m in self.members for i in m.inputs] + [crop_of(n) for n in self.descriptor_names]
        return tuple(dict.fromkeys(names))

    @property
    def config(self) -> dict:
        """What the version row keeps (the portal reads it without loading the checkpoint)."""
        shares = self.stack.share_of()
        members = {m.kind: {"names": list(m.names), "feature_key": m.feature_key} for m in self.members}
        return {"backbone": self.backbone, "regions": list(self.regions), "num_classes": self.num_classes,
                "members": members, "weights": {n: shares.get(n, 0.0) for n in self.names},
                "stack": {"kind": self.stack.kind, **{k: v for k, v in self.stack.fit.items() if k != "members"}},
                "descriptors": {"feature_key": self.descriptor_key, "names": list(self.descriptor_names),
                                "keys": {n: self.key_of(n) for n in self.descriptor_names},
                                "gallery": list(self.gallery_names)},
                "contract": self.contract}


def crop_of(descriptor_name: str) -> str:
    """The stored crop a descriptor is computed from: the face chip for ``identity``, else the region's cut."""
    from shared.ml.members.identity import CHIP_REGION

    return CHIP_REGION if descriptor_name == MEMBER else cut_name(descriptor_name)


@dataclass
class Prediction:
    names: tuple[str, ...]
    member_probs: np.ndarray  # N x M x C, one score per member name
    aggregate: np.ndarray  # N x C
    scores: list[Scores]  # per member, with the features to cache
    # By descriptor name, what the encoder gives of each face (N x 128 for "identity", N x 256 for a region)
    descriptors: dict[str, np.ndarray] | None = None
    ood: list[dict] | None = None  # per face, how unlike the training photos (OODReference.score)

    def probs_of(self, name: str) -> np.ndarray:
        return self.member_probs[:, self.names.index(name)]


def predict(model: GestaltModel, crops: dict[str, np.ndarray], encode: Callable[[np.ndarray, bool], np.ndarray] | None,
            precision: str = "auto", flip_tta: bool = False,
            known: dict[str, dict[tuple[str, bool], np.ndarray]] | None = None) -> Prediction:
    """Every member's scores for the faces whose stored crops are ``crops`` (name -> ``N x ...``), and their aggregate.

    Args:
        encode: the identity encoder, ``(K x 150 x 150 x 3 uint8, flip) -> K x 128``; None when no member needs it.
        precision: "fp32", "bf16" or "auto", for members with networks of their own.
        flip_tta: CASIA members average each region's softmax with its mirror image's.
        known: what the encoder gave already (``{"descriptors": {(crop, flip): ...}, "features": {...}}``): those
            crops are not encoded again.
    """
    known = known or {}
    passes = Passes(crops, encode, precision, flip_tta, _descriptors=dict(known.get("descriptors") or {}),
                    _features=dict(known.get("features") or {}))
    wanted = [p for m in model.members for p in m.encoder_inputs]
    wanted += [(crop_of(n), model.flip) for n in model.descriptor_names] if model.encoder_sha else []
    splits = {k: b for m in model.members for k, b in m.encoder_splits.items()}
    passes.prepare(wanted, splits)  # one encoder pass over everything the members and the gallery read
    n = len(next(iter(crops.values()))) if crops else 0
    scores = [m.score(passes) for m in model.members]
    if scores:
        member_probs = np.concatenate([s.probs for s in scores], axis=1).astype(np.float32)
        aggregate = model.stack.combine(member_probs[:, [model.names.index(x) for x in model.stack.names]])
    else:
        member_probs = np.zeros((n, 0, model.num_classes), np.float32)
        aggregate = np.zeros((n, model.num_classes), np.float32)
    descriptors = ood = None
    if model.encoder_sha:
        descriptors = {d: passes.descriptors(crop_of(d), model.flip) if d == MEMBER else
                       passes.features(crop_of(d), model.flip) for d in model.descriptor_names}
        if model.ood is not None:
            ood = model.ood.score(unit_concat([descriptors[n] for n in model.gallery_names]))
    return Prediction(model.names, member_probs, aggregate, scores, descriptors, ood)


def gallery_model(encoder_sha: str, regions: tuple[str, ...], flip: bool = True) -> GestaltModel:
    """A model with no trained member: it keeps the encoder's descriptors of every face's chip and of its
    ``regions``' cuts, matches the gallery on the chip's (GestaltMatcher's way), and ranks nothing itself: a
    clinic's first days, before enough diagnoses to train heads on (the nightly run then fits them on these
    descriptors)."""
    return GestaltModel([], [], Stack((), np.zeros(0), np.zeros(0)), NONE, None, (*regions, MEMBER), encoder_sha,
                        flip, gallery_names=(MEMBER,))

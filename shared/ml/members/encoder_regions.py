"""The regional members built on the identity encoder: each region of the paper (full face, upper half, middle
face, lower half) cut from the aligned face at the encoder's 150 px (:func:`shared.ml.preprocess.regions.cut_regions`),
described by the encoder's stage features (the 256-channel stage averaged over space:
:mod:`shared.ml.nets.encoder_runner` says why), and scored by a head of the identity member's kind
(:class:`IdentityHead`).

The encoder is the face-identity network learned on millions of faces (:mod:`shared.ml.nets.encoder`): the
paper's recipe (identity pretraining at scale, then fine-tuning per region) with a far larger pretraining than a
clinic could run. A region's member either reads the frozen encoder's features, or its own fine-tuned copy of the
encoder's blocks up to them (:class:`~shared.ml.nets.encoder_runner.EncoderTail`, from the activations the frozen
blocks before it give; which regions, and from which block, were chosen on held-out training photos by
:mod:`shared.ml.train.finetune`). The features each head reads are cached in the feature store under
:attr:`EncoderRegions.feature_key` (the encoder's stage-feature key when nothing is fine-tuned), one row per
region, so that refitting the heads nightly needs no network at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from shared.ml.members.base import Member, Passes, Scores
from shared.ml.members.identity import IdentityHead, features_key
from shared.ml.preprocess.regions import cut_name


@dataclass
class EncoderRegions(Member):
    """One head per region on the frozen encoder's descriptor of that region's cut."""

    kind: ClassVar[str] = "encoder_regions"
    regions: tuple[str, ...]
    heads: dict[str, IdentityHead]
    encoder_sha: str = ""
    flip: bool = True
    validation: dict = field(default_factory=dict)
    # region -> its fine-tuned copy of the encoder's blocks from ``tail_block`` on (regions not here read the
    # frozen encoder's descriptor).
    tails: dict = field(default_factory=dict)
    tail_block: int = 0

    def __post_init__(self) -> None:
        self.regions = tuple(self.regions)
        missing = [r for r in self.regions if r not in self.heads]
        if missing:
            raise ValueError(f"no head for region(s) {', '.join(missing)}")

    @property
    def names(self) -> tuple[str, ...]:
        return self.regions

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(cut_name(r) for r in self.regions)

    @property
    def encoder_inputs(self) -> list[tuple[str, bool]]:
        return [(cut_name(r), self.flip) for r in self.regions]

    @property
    def encoder_splits(self) -> dict[tuple[str, bool], int]:
        return {(cut_name(r), self.flip): self.tail_block for r in self.tails}

    @property
    def feature_key(self) -> str:
        """The encoder's stage-feature key when every region reads the frozen encoder; else one that also covers
        the tails' weights (their features differ from the frozen encoder's)."""
        key = features_key(self.encoder_sha, self.flip)
        if not self.tails:
            return key
        import hashlib

        h = hashlib.sha256(key.encode())
        for region in sorted(self.tails):
            h.update(region.encode())
            for name, tensor in sorted(self.tails[region].state_dict().items()):
                h.update(name.encode())
                h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def describe(self, passes: Passes, region: str) -> np.ndarray:
        """The features the region's head reads: its tail's on the frozen blocks' activations, or the frozen ones."""
        if region in self.tails:
            return self.tails[region].describe(passes.activations(cut_name(region), self.flip, self.tail_block))
        return passes.features(cut_name(region), self.flip)

    @property
    def num_classes(self) -> int:
        return next(iter(self.heads.values())).num_classes

    def score(self, passes: Passes) -> Scores:
        feats = np.stack([self.describe(passes, r) for r in self.regions], axis=1)
        probs = np.stack([self.heads[r].probs(feats[:, i]) for i, r in enumerate(self.regions)], axis=1)
        return Scores(self.names, probs, feats, self.feature_key)

    def probs_from_features(self, features: np.ndarray) -> np.ndarray:
        """``N x R x C`` from cached features ``N x R x 256`` (regions in :attr:`regions` order)."""
        return np.stack([self.heads[r].probs(features[:, i]) for i, r in enumerate(self.regions)], axis=1)

    def state(self) -> dict:
        return {"regions": list(self.regions), "heads": {r: h.state() for r, h in self.heads.items()},
                "encoder_sha": self.encoder_sha, "flip": bool(self.flip), "validation": self.validation,
                "tail_block": int(self.tail_block),
                "tails": {r: {k: v.detach().cpu() for k, v in t.state_dict().items()} for r, t in self.tails.items()}}

    @classmethod
    def from_state(cls, state: dict) -> EncoderRegions:
        tails, block = {}, int(state.get("tail_block", 0))
        if state.get("tails"):
            from shared.ml.nets.encoder import DlibFaceResNet
            from shared.ml.nets.encoder_runner import EncoderTail

            shape = DlibFaceResNet()  # the architecture only: every tensor is replaced by the saved ones
            for region, weights in state["tails"].items():
                tail = EncoderTail(shape, block)
                tail.load_state_dict(weights)
                tails[region] = tail.eval()
        return cls(tuple(state["regions"]), {r: IdentityHead.from_state(h) for r, h in state["heads"].items()},
                   state.get("encoder_sha", ""), bool(state.get("flip", True)), dict(state.get("validation") or {}),
                   tails, block)

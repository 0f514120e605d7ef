"""What every member of a model is to the rest of Gestalt, and the forward passes members share.

A member reads some of a face's stored crops (:attr:`Member.inputs`), and gives one or more named scores
(:attr:`Member.names`: a regional member gives one per region) and, per score, the feature vector it was
computed from (cached in the feature store under :attr:`Member.feature_key`, for the gallery and for
retraining its heads). The workers, ``gestalt train``, ``gestalt evaluate`` and the nightly retraining all go
through :func:`shared.ml.members.model.predict`, which runs the members and combines their scores
(:mod:`shared.ml.members.stack`); none of them knows what kind of member it holds.

Members built on the identity encoder share its forward pass (:class:`Passes`): every crop any of them reads
goes through the encoder once per batch, in one batch.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass
class Scores:
    """One member's output for ``N`` faces."""

    names: tuple[str, ...]
    probs: np.ndarray  # N x M x C, one score per name
    features: np.ndarray  # N x M x F, what each score was computed from
    feature_key: str  # where ``features`` are cached (image_features.backbone_sha), rows named by ``names``


@dataclass
class Passes:
    """The forward passes of one batch that members share.

    ``crops``: the batch's stored crops by name (``N x ...`` each). ``encode`` is the identity encoder, an
    :class:`~shared.ml.nets.encoder_runner.EncoderRunner`: :meth:`prepare` runs it once over every crop any member
    reads through it (one pass per flip setting, and per block a fine-tuned tail starts from), and
    :meth:`descriptors`, :meth:`features` and :meth:`activations` hand each member its part.
    """

    crops: dict[str, np.ndarray]
    encode: Any = None
    precision: str = "auto"
    flip_tta: bool = False
    device: Any = None  # where members with networks of their own run (None: where they are)
    _descriptors: dict[tuple[str, bool], np.ndarray] = field(default_factory=dict)
    _features: dict[tuple[str, bool], np.ndarray] = field(default_factory=dict)
    _activations: dict[tuple[str, bool, int], np.ndarray] = field(default_factory=dict)

    def prepare(self, wanted: list[tuple[str, bool]], splits: dict[tuple[str, bool], int] | None = None) -> None:
        """Encode the crops named in ``wanted`` ((name, flip) pairs) in one pass per flip setting (and per block of
        ``splits``: (name, flip) -> the block whose incoming activations a tail reads)."""
        splits = {k: b for k, b in (splits or {}).items() if (*k, b) not in self._activations}
        known = set(self._descriptors) | set(self._features)  # crops given with what their members read
        self._run([k for k in dict.fromkeys([*wanted, *splits]) if k not in known or k in splits], splits)

    def _run(self, pending: list[tuple[str, bool]], splits: dict[tuple[str, bool], int]) -> None:
        for flip, block in sorted({(f, splits.get((n, f))) for n, f in pending}, key=lambda g: (g[0], g[1] or -1)):
            names = [n for n, f in pending if f == flip and splits.get((n, f)) == block]
            if self.encode is None:
                raise ValueError("this model's members need the identity encoder, and none was given")
            n = len(self.crops[names[0]])
            out = self.encode.run(np.concatenate([self.crops[name] for name in names]), flip, block)
            for i, name in enumerate(names):
                part = slice(i * n, (i + 1) * n)
                self._descriptors[(name, flip)] = out.descriptors[part]
                self._features[(name, flip)] = out.features[part]
                if out.activations is not None:
                    self._activations[(name, flip, block)] = out.activations[part]

    def descriptors(self, name: str, flip: bool) -> np.ndarray:
        """The encoder's identity descriptors of crop ``name`` (``N x 128``), encoded now if :meth:`prepare` did
        not."""
        if (name, flip) not in self._descriptors:
            self._run([(name, flip)], {})
        return self._descriptors[(name, flip)]

    def features(self, name: str, flip: bool) -> np.ndarray:
        """The encoder's stage features of crop ``name`` (``N x 256``)."""
        if (name, flip) not in self._features:
            self._run([(name, flip)], {})
        return self._features[(name, flip)]

    def activations(self, name: str, flip: bool, block: int) -> np.ndarray:
        """The activations entering the encoder's block ``block`` for crop ``name`` (``N x V x C x H x W``)."""
        if (name, flip, block) not in self._activations:
            self.prepare([], {(name, flip): block})
        return self._activations[(name, flip, block)]


class Member(ABC):
    """A member of a model: a name per score, the crops it reads, and how it scores them."""

    kind: ClassVar[str]
    names: tuple[str, ...]
    inputs: tuple[str, ...]

    @property
    def encoder_inputs(self) -> list[tuple[str, bool]]:
        """The (crop, flip) pairs this member reads through the shared identity encoder; [] for none."""
        return []

    @property
    def encoder_splits(self) -> dict[tuple[str, bool], int]:
        """(crop, flip) -> the encoder block whose incoming activations a fine-tuned part of this member reads."""
        return {}

    @property
    @abstractmethod
    def feature_key(self) -> str:
        """Where this member's features are cached (one key per backbone and input transform)."""

    @property
    @abstractmethod
    def num_classes(self) -> int: ...

    @abstractmethod
    def score(self, passes: Passes) -> Scores:
        """Scores and features of the batch in ``passes``."""

    @abstractmethod
    def state(self) -> dict:
        """Plain values and tensors (what a checkpoint keeps; loads with ``weights_only``)."""

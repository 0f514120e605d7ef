"""The paper's regional members: one CASIA-Net per region on its 100 x 100 grayscale crop, as one member with a
score per region (one batched forward pass per region; :mod:`shared.ml.nets.ensemble`).

``gestalt train --backbone casia`` builds them (the paper-faithful configuration, trained on the clinic's own
photos, optionally from a face-identification pretraining by ``gestalt pretrain``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar

import torch

from shared.ml.members.base import Member, Passes, Scores
from shared.ml.nets.ensemble import RegionalEnsemble, backbone_sha, predict_regions


@dataclass(eq=False)
class CasiaRegions(Member):
    """The regional CASIA-Nets of a model (the network holds its own final layers)."""

    kind: ClassVar[str] = "casia"
    net: RegionalEnsemble

    @property
    def names(self) -> tuple[str, ...]:
        return self.net.regions

    @property
    def regions(self) -> tuple[str, ...]:
        return self.net.regions

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.net.regions

    @cached_property
    def feature_key(self) -> str:
        return backbone_sha(self.net)

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def score(self, passes: Passes) -> Scores:
        import numpy as np

        crops = np.stack([passes.crops[r] for r in self.regions], axis=1)
        pred = predict_regions(self.net, crops, flip_tta=passes.flip_tta, precision=passes.precision)
        return Scores(self.names, pred.region_probs, pred.features, self.feature_key)

    def state(self) -> dict:
        return {"arch": self.net.arch, "config": self.net.config,
                "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()}}

    @classmethod
    def from_state(cls, state: dict) -> CasiaRegions:
        cfg = state["config"]
        net = RegionalEnsemble(tuple(cfg["regions"]), cfg["num_classes"], state["arch"], cfg["width"])
        net.load_state_dict(state["state_dict"])
        return cls(net.eval())

    def to(self, device: torch.device | str) -> CasiaRegions:
        self.net.to(device)
        self.__dict__.pop("feature_key", None)
        return self


def casia_only(net: RegionalEnsemble, class_names: list[str]):
    """A model of the regional CASIA-Nets alone, their softmaxes averaged (the paper's aggregate)."""
    import numpy as np

    from shared.ml.members.model import CASIA, GestaltModel
    from shared.ml.members.stack import MEAN, Stack

    regions = tuple(net.regions)
    stack = Stack(regions, np.full(len(regions), 1.0 / len(regions)), None, MEAN, {"source": "the regions' mean"})
    return GestaltModel(list(class_names), [CasiaRegions(net)], stack, CASIA, descriptor_names=(), gallery_names=())

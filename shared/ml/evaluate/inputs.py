"""What an evaluation report is computed from (:class:`EvalInput`), and the class each image is called."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from shared.ml.evaluate import statistics as ev


@dataclass
class EvalInput:
    """Everything the report is computed from."""

    model_name: str
    class_names: list[str]
    regions: list[str]
    region_probs: np.ndarray  # N x R x C: the ensemble's members (regions, then the identity member if any)
    labels: np.ndarray  # N
    subjects: list[str]
    data_source: str
    data_hash: str
    split: str
    rejected: list[tuple[str, str]] = field(default_factory=list)
    aligned: np.ndarray | None = None  # N x H x W uint8 aligned faces, for composites
    baseline_accuracy: float | None = None
    baseline_n: int | None = None
    positive: str | None = None  # binary models: the positive class
    resamples: int = ev.DEFAULT_RESAMPLES
    permutations: int = 100_000
    seed: int = 0
    images: list[str] | None = None  # per image: its file, for predictions.csv
    original_labels: list[str] | None = None  # per image: the test set's own label (before the model's mapping)
    label_map: dict[str, str] = field(default_factory=dict)  # original label -> class, as applied
    threshold: float | None = None  # binary: operating threshold on the positive probability
    threshold_source: str = ""
    prevalence: float | None = None  # binary: PPV/NPV also at this prevalence
    preprocessing: dict = field(default_factory=dict)  # detector/landmarker names and weight hashes
    temperature: float | None = None  # the calibration temperature applied to the scores, if any
    # (image index, class index) -> RGB overlay of the aligned face with that class's heatmap, for the error gallery
    heatmap: Callable[[int, int], np.ndarray] | None = None
    # Each member's weight in the aggregate (sums to 1); None: the members' plain mean.
    member_weights: list[float] | None = None
    # Per image, how unlike the model's training photos (shared.ml.members.identity.OODReference.score), if known.
    ood: list[dict] | None = None
    # N x C: the aggregate as the model computed it (its stack of the members); None: from member_weights.
    aggregate_probs: np.ndarray | None = None
    # Per image, whether its face is flagged as turned (scored, less reliable: shared.ml.preprocess.quality), if known.
    turned: np.ndarray | None = None

    def aggregate(self) -> np.ndarray:
        """``N x C``: the members combined as the model combines them."""
        if self.aggregate_probs is not None:
            return np.asarray(self.aggregate_probs)
        if self.member_weights is None:
            return self.region_probs.mean(axis=1)
        return np.einsum("nrc,r->nc", self.region_probs, np.asarray(self.member_weights, np.float64))


def positive_index(inp: EvalInput) -> int:
    return inp.class_names.index(inp.positive) if inp.positive in inp.class_names else 0


def calls(inp: EvalInput) -> np.ndarray:
    """The class each image is called: argmax, or for two classes the positive class at the threshold."""
    agg = inp.aggregate()
    if len(inp.class_names) != 2:
        return agg.argmax(axis=1)
    pos = positive_index(inp)
    thr = ev.DEFAULT_THRESHOLD if inp.threshold is None else inp.threshold
    return np.where(agg[:, pos] >= thr, pos, 1 - pos)

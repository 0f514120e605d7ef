"""Evaluation statistics: top-k per image and per disorder, bootstrap CIs, permutation and z-tests.

The paper's protocol: every figure with a 95% percentile-bootstrap CI (10,000
resamples), multiclass significance by a permutation test over the test labels,
and binary results against a published baseline by a two-sided two-proportion
z-test. Resampling and testing use scipy.stats and statsmodels.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import proportions_ztest

DEFAULT_RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A figure with its percentile-bootstrap confidence interval (fractions, not percent)."""

    value: float
    low: float
    high: float
    n: int

    def as_dict(self) -> dict:
        return asdict(self)

    def percent(self, digits: int = 1) -> str:
        return f"{100 * self.value:.{digits}f}% ({100 * self.low:.{digits}f}–{100 * self.high:.{digits}f})"


def topk_hits(probs: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Boolean per image: is the true label among the ``k`` highest scores?"""
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    k = min(k, probs.shape[1])
    true_score = probs[np.arange(len(labels)), labels]
    # Rank = number of classes scored strictly higher; ties count in the image's favour.
    rank = (probs > true_score[:, None]).sum(axis=1)
    return rank < k


def true_ranks(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """1-based rank of the true label for each image."""
    true_score = probs[np.arange(len(labels)), labels]
    return (probs > true_score[:, None]).sum(axis=1) + 1


def _macro(hits: np.ndarray, labels: np.ndarray, axis: int = -1) -> np.ndarray:
    """Mean over disorders of the per-disorder hit rate, vectorised over resamples (leading axes)."""
    hits = np.moveaxis(np.asarray(hits, dtype=np.float64), axis, -1)
    labels = np.moveaxis(np.asarray(labels), axis, -1)
    lead = hits.shape[:-1]
    hits2 = hits.reshape(-1, hits.shape[-1])
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(labels.shape).reshape(-1, labels.shape[-1])
    n_classes = int(inverse.max()) + 1
    rows = len(hits2)
    flat = (np.arange(rows)[:, None] * n_classes + inverse).ravel()
    sums = np.bincount(flat, weights=hits2.ravel(), minlength=rows * n_classes).reshape(rows, n_classes)
    counts = np.bincount(flat, minlength=rows * n_classes).reshape(rows, n_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = sums / counts
    # Disorders absent from a resample are skipped, not counted as zero.
    return np.nanmean(per_class, axis=-1).reshape(lead)


def bootstrap_mean(hits: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
    """Per-image accuracy with a percentile-bootstrap CI."""
    hits = np.asarray(hits, dtype=np.float64)
    if len(hits) == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    if np.all(hits == hits[0]):  # no variance: every resample is the same
        return Estimate(float(hits[0]), float(hits[0]), float(hits[0]), len(hits))
    res = stats.bootstrap((hits,), np.mean, n_resamples=resamples, confidence_level=CONFIDENCE,
                          method="percentile", random_state=np.random.default_rng(seed), vectorized=True)
    return Estimate(float(hits.mean()), float(res.confidence_interval.low), float(res.confidence_interval.high),
                    len(hits))


def bootstrap_macro(hits: np.ndarray, labels: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                    seed: int = 0) -> Estimate:
    """Accuracy averaged per disorder, with a percentile-bootstrap CI over images."""
    hits = np.asarray(hits, dtype=np.float64)
    labels = np.asarray(labels)
    value = float(_macro(hits, labels))
    if len(hits) < 2 or np.all(hits == hits[0]):
        return Estimate(value, value, value, len(hits))
    res = stats.bootstrap((hits, labels), lambda h, lab, axis=-1: _macro(h, lab, axis), paired=True,
                          n_resamples=resamples, confidence_level=CONFIDENCE, method="percentile",
                          random_state=np.random.default_rng(seed), vectorized=True, batch=1000)
    return Estimate(value, float(res.confidence_interval.low), float(res.confidence_interval.high), len(hits))


def bootstrap_ci_counts(k: int, n: int, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Estimate:
    """The CI of an accuracy known only as ``k`` correct out of ``n``."""
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    return bootstrap_mean(np.r_[np.ones(k), np.zeros(n - k)], resamples, seed)


def permutation_pvalue(probs: np.ndarray, labels: np.ndarray, k: int = 1, resamples: int = 100_000,
                       seed: int = 0) -> float:
    """P-value of top-k accuracy against chance: the test labels are permuted over the images.

    The statistic is vectorised (one gather per permutation batch), so 10^5
    permutations of 500 images take seconds. The p-value floor is 1/(resamples+1).
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    k = min(k, probs.shape[1])
    # topk[i, c]: is class c among image i's k best? Then a labelling's accuracy is one gather.
    kth = -np.partition(-probs, k - 1, axis=1)[:, k - 1]
    topk = probs >= kth[:, None]
    rows = np.arange(len(labels))

    def statistic(y, axis=-1):
        return topk[rows, y].mean(axis=axis)

    res = stats.permutation_test((labels,), statistic, permutation_type="pairings", n_resamples=resamples,
                                 alternative="greater", vectorized=True, batch=2000,
                                 random_state=np.random.default_rng(seed))
    return float(res.pvalue)


@dataclass(frozen=True)
class ZTest:
    z: float
    p: float
    p1: float
    p2: float


def two_proportion_ztest(k1: int, n1: int, p2: float, n2: int) -> ZTest:
    """Two-sided pooled two-proportion z-test of k1/n1 against a baseline proportion p2 on n2."""
    if not (n1 > 0 and n2 > 0 and 0 <= k1 <= n1 and 0 <= p2 <= 1):
        raise ValueError("need 0 <= k1 <= n1, n1 > 0, n2 > 0 and 0 <= p2 <= 1")
    z, p = proportions_ztest(np.array([k1, p2 * n2]), np.array([n1, n2]), alternative="two-sided")
    return ZTest(float(z), float(p), k1 / n1, p2)


def binary_metrics(predicted_positive: np.ndarray, positive: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                   seed: int = 0) -> dict[str, Estimate]:
    """Accuracy, sensitivity and specificity of a one-against-others model, with CIs."""
    pred = np.asarray(predicted_positive, bool)
    truth = np.asarray(positive, bool)
    return {
        "accuracy": bootstrap_mean(pred == truth, resamples, seed),
        "sensitivity": bootstrap_mean(pred[truth], resamples, seed),
        "specificity": bootstrap_mean(~pred[~truth], resamples, seed),
    }


def topk_table(probs: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 10),
               resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, dict[str, Estimate]]:
    """Per-image and per-disorder (macro) top-k, each with its CI."""
    out: dict[str, dict[str, Estimate]] = {"per_image": {}, "macro": {}}
    for k in ks:
        hits = topk_hits(probs, labels, k)
        out["per_image"][f"top{k}"] = bootstrap_mean(hits, resamples, seed)
        out["macro"][f"top{k}"] = bootstrap_macro(hits, labels, resamples, seed)
    return out

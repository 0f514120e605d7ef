"""Evaluation statistics: top-k per image and per disorder, bootstrap CIs, permutation and z-tests.

The paper's protocol: every figure with a 95% percentile-bootstrap CI (10,000
resamples), multiclass significance by a permutation test over the test labels,
and binary results against a published baseline by a two-sided two-proportion
z-test. Resampling and testing use scipy.stats and statsmodels.

A proportion k/n needs no resampling: its bootstrap distribution is exactly
Binomial(n, k/n) / n, so :func:`bootstrap_ci_counts` takes the percentiles from
``scipy.stats.binom.ppf`` (the same figures every time, whatever the seed).
Reports give proportions exact Clopper-Pearson intervals (:func:`proportion`),
which, unlike the percentile bootstrap, are not 0-0 for 0 of 3. Monte Carlo
remains where no closed form exists: macro (per-disorder) accuracy and the AUC.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

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
        if self.n == 0 or not np.isfinite(self.value):
            return "n/a"
        return f"{100 * self.value:.{digits}f}% ({100 * self.low:.{digits}f}–{100 * self.high:.{digits}f})"


NAN_ESTIMATE = Estimate(float("nan"), float("nan"), float("nan"), 0)


def exact_bootstrap_counts(k: int, n: int) -> Estimate:
    """The percentile-bootstrap CI of k/n without Monte Carlo: the 2.5/97.5 percentiles of Binomial(n, k/n) / n."""
    if not 0 <= k <= n or n <= 0:
        raise ValueError(f"need 0 <= k <= n and n > 0, got k={k}, n={n}")
    alpha = 1 - CONFIDENCE
    low, high = stats.binom.ppf([alpha / 2, 1 - alpha / 2], n, k / n)
    return Estimate(k / n, float(low) / n, float(high) / n, n)


def proportion(k: int, n: int, method: str = "beta") -> Estimate:
    """k of n with its exact (Clopper-Pearson, ``beta``) or ``wilson`` 95% interval; n/a for n = 0."""
    if n == 0:
        return NAN_ESTIMATE
    low, high = proportion_confint(int(k), int(n), alpha=1 - CONFIDENCE, method=method)
    return Estimate(k / n, float(low), float(high), int(n))


def proportion_of(hits: np.ndarray) -> Estimate:
    """The share of True in ``hits`` with its Clopper-Pearson interval."""
    hits = np.asarray(hits, bool)
    return proportion(int(hits.sum()), len(hits))


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
    if np.all((hits == 0) | (hits == 1)):  # a proportion: its bootstrap distribution is known exactly
        return exact_bootstrap_counts(int(hits.sum()), len(hits))
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
    """The percentile-bootstrap CI of an accuracy known only as ``k`` correct out of ``n``.

    Exact (see :func:`exact_bootstrap_counts`); ``resamples`` and ``seed`` are accepted for
    compatibility and do not change the result.
    """
    return exact_bootstrap_counts(k, n)


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


# ---------------------------------------------------------------------------- screening (binary) models
DEFAULT_THRESHOLD = 0.5
CALIBRATION_BINS = 10


def auc_with_ci(truth: np.ndarray, score: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                seed: int = 0) -> Estimate:
    """ROC AUC (``sklearn.metrics.roc_auc_score``) with a 95% percentile-bootstrap CI over images.

    Each resample's AUC is the Mann-Whitney statistic of its ranks (ties averaged, as scikit-learn
    does), vectorised over resamples; resamples that lack a class are redrawn by skipping them.
    n/a when the test set has one class only.
    """
    from sklearn.metrics import roc_auc_score

    truth = np.asarray(truth, bool)
    score = np.asarray(score, np.float64)
    n_pos = int(truth.sum())
    if n_pos == 0 or n_pos == len(truth):
        return NAN_ESTIMATE
    value = float(roc_auc_score(truth, score))
    rng = np.random.default_rng(seed)
    aucs = []
    for start in range(0, resamples, 2000):
        idx = rng.integers(0, len(truth), (min(2000, resamples - start), len(truth)))
        t, s = truth[idx], score[idx]
        ranks = stats.rankdata(s, axis=1)
        n1 = t.sum(axis=1)
        n0 = t.shape[1] - n1
        ok = (n1 > 0) & (n0 > 0)
        u = (ranks * t).sum(axis=1) - n1 * (n1 + 1) / 2
        aucs.append(u[ok] / (n1[ok] * n0[ok]))
    aucs = np.concatenate(aucs)
    alpha = 1 - CONFIDENCE
    low, high = np.percentile(aucs, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return Estimate(value, float(low), float(high), len(truth))


def predictive_value_at(sens: Estimate, spec: Estimate, prevalence: float) -> dict[str, Estimate]:
    """PPV and NPV at a stated prevalence (Bayes), with intervals from the ends of sensitivity's and
    specificity's intervals (PPV and NPV rise with both, so the ends map onto the ends)."""
    def ppv(se: float, sp: float) -> float:
        den = se * prevalence + (1 - sp) * (1 - prevalence)
        return se * prevalence / den if den > 0 else float("nan")

    def npv(se: float, sp: float) -> float:
        den = sp * (1 - prevalence) + (1 - se) * prevalence
        return sp * (1 - prevalence) / den if den > 0 else float("nan")

    if sens.n == 0 or spec.n == 0:
        return {"ppv": NAN_ESTIMATE, "npv": NAN_ESTIMATE}
    n = sens.n + spec.n
    return {"ppv": Estimate(ppv(sens.value, spec.value), ppv(sens.low, spec.low), ppv(sens.high, spec.high), n),
            "npv": Estimate(npv(sens.value, spec.value), npv(sens.low, spec.low), npv(sens.high, spec.high), n)}


def calibration(prob: np.ndarray, outcome: np.ndarray, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error and the reliability diagram's bins (equal-width on [0, 1]).

    ECE = sum over bins of (images in bin / all images) * |mean predicted probability - observed rate|.
    """
    prob = np.asarray(prob, np.float64)
    outcome = np.asarray(outcome, np.float64)
    which = np.minimum((prob * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        inside = which == b
        if not inside.any():
            continue
        conf, rate = float(prob[inside].mean()), float(outcome[inside].mean())
        ece += inside.mean() * abs(conf - rate)
        rows.append({"low": b / bins, "high": (b + 1) / bins, "n": int(inside.sum()), "confidence": conf,
                     "observed": rate})
    return {"ece": float(ece) if len(prob) else float("nan"), "bins": rows}


def screening_metrics(pos_prob: np.ndarray, positive: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
                      prevalence: float | None = None, resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      with_auc: bool = True) -> dict:
    """Everything a screening model is judged by, at the operating ``threshold`` on the positive probability.

    Proportions (accuracy, sensitivity, specificity, PPV and NPV at the test prevalence) carry exact
    Clopper-Pearson intervals; PPV and NPV at a stated ``prevalence`` are derived from sensitivity and
    specificity. A figure that the test set cannot give (sensitivity without positives) is n/a.
    """
    pos_prob = np.asarray(pos_prob, np.float64)
    truth = np.asarray(positive, bool)
    call = pos_prob >= threshold
    tp, fn = int((call & truth).sum()), int((~call & truth).sum())
    tn, fp = int((~call & ~truth).sum()), int((call & ~truth).sum())
    out: dict = {
        "threshold": float(threshold), "counts": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
        "n_positive": int(truth.sum()), "n_negative": int((~truth).sum()),
        "accuracy": proportion(tp + tn, len(truth)),
        "sensitivity": proportion(tp, tp + fn), "specificity": proportion(tn, tn + fp),
        "ppv": proportion(tp, tp + fp), "npv": proportion(tn, tn + fn),
        "test_prevalence": float(truth.mean()) if len(truth) else float("nan"),
    }
    if prevalence is not None:
        out["at_prevalence"] = {"prevalence": float(prevalence),
                                **predictive_value_at(out["sensitivity"], out["specificity"], prevalence)}
    if with_auc:
        out["auc"] = auc_with_ci(truth, pos_prob, resamples, seed)
    return out


def choose_threshold(pos_prob: np.ndarray, positive: np.ndarray) -> float | None:
    """The operating threshold that maximises Youden's J (sensitivity + specificity - 1) on validation data.

    Returns the midpoint between the chosen score and the next lower one (robust to tiny score shifts),
    or None when the data lack a class (the caller then keeps the default 0.5).
    """
    from sklearn.metrics import roc_curve

    truth = np.asarray(positive, bool)
    if truth.all() or not truth.any():
        return None
    fpr, tpr, thr = roc_curve(truth, np.asarray(pos_prob, np.float64))
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1  # thr[0] is +inf
    below = np.asarray(pos_prob)[np.asarray(pos_prob) < thr[best]]
    t = (thr[best] + below.max()) / 2 if len(below) else thr[best]
    return float(min(max(t, 1e-6), 1.0))


@dataclass(frozen=True)
class McNemar:
    n: int
    both_right: int
    only_a: int
    only_b: int
    both_wrong: int
    statistic: float
    p: float
    exact: bool


def mcnemar_test(a_correct: np.ndarray, b_correct: np.ndarray, exact: bool = True) -> McNemar:
    """McNemar's paired test of two models on the same images (statsmodels; exact binomial by default)."""
    from statsmodels.stats.contingency_tables import mcnemar

    a = np.asarray(a_correct, bool)
    b = np.asarray(b_correct, bool)
    if a.shape != b.shape:
        raise ValueError("both models must be scored on the same images")
    table = np.array([[int((a & b).sum()), int((a & ~b).sum())], [int((~a & b).sum()), int((~a & ~b).sum())]])
    res = mcnemar(table, exact=exact, correction=True)
    return McNemar(len(a), int(table[0, 0]), int(table[0, 1]), int(table[1, 0]), int(table[1, 1]),
                   float(res.statistic), float(res.pvalue), exact)


# ---------------------------------------------------------------------------- temperature scaling
def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """Softmax outputs recomputed at ``temperature``: softmax(log p / T) over the last axis.

    The log of a softmax equals its logits up to a constant per row, so scaling needs no logits.
    T > 1 softens overconfident scores, T < 1 sharpens them; the ranking of each row is unchanged.
    """
    logp = np.log(np.clip(np.asarray(probs, np.float64), 1e-12, None)) / float(temperature)
    logp -= logp.max(axis=-1, keepdims=True)
    e = np.exp(logp)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def fit_temperature(region_probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> float:
    """The temperature (one for all members) that minimises the negative log-likelihood of the aggregate
    (the mean, or with ``weights`` the weighted sum, of the members' scaled softmaxes) on held-out data,
    searched over 0.05-20."""
    from scipy.optimize import minimize_scalar

    labels = np.asarray(labels)
    rows = np.arange(len(labels))

    def nll(log_t: float) -> float:
        scaled = apply_temperature(region_probs, float(np.exp(log_t)))
        agg = scaled.mean(axis=-2) if weights is None else np.einsum("nrc,r->nc", scaled, np.asarray(weights))
        return float(-np.log(np.clip(agg[rows, labels], 1e-12, None)).mean())

    res = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))

"""How a model's members combine into one ranking: one weight per member, fitted on held-out scores.

The aggregate is a logistic stack over the members' log-probabilities (log-linear pooling): for each class
``c``, ``z_c = sum_m w_m log p_mc + b_c`` and the aggregate is ``softmax(z)``. With one non-negative weight
per member and a bias per class it cannot learn which member to trust for which syndrome (that would need
more held-out photos than a clinic has), but it can trust a sharper member more, ignore one that adds
nothing, and sharpen the agreement of several: the aggregate of members that err on different photos beats
each of them. The weights are fitted (L-BFGS-B, ``w >= 0``, a small L2 penalty, so that a member that adds
nothing ends near weight 0 rather than keeping a share it did not earn) on
out-of-fold, subject-grouped scores (:func:`fit_stack`); never on scores of photos a member was fitted on.

A model saved before stacking (checkpoint format 1) combined its members by a weighted mean of
probabilities; :class:`Stack` keeps that rule as ``kind="mean"`` so those models score as they did.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

LOGISTIC, MEAN = "logistic", "mean"
# Probabilities are floored here before the log: a member's "impossible" is strong evidence, never infinite.
FLOOR = 1e-6
# The L2 penalty on the weights and the biases, per photo.
RIDGE = 1e-3
# Fewer held-out photos than this, or a single class among them: the members are weighted equally.
MIN_PHOTOS = 10


@dataclass
class Stack:
    """The combining rule: member names, one weight each, a bias per class (logistic) or none (mean)."""

    names: tuple[str, ...]
    weights: np.ndarray  # M
    bias: np.ndarray | None = None  # C (logistic only)
    kind: str = LOGISTIC
    fit: dict = field(default_factory=dict)  # how the weights were chosen (photos, log-loss, source)

    def __post_init__(self) -> None:
        self.names = tuple(self.names)
        self.weights = np.asarray(self.weights, np.float64)
        if len(self.weights) != len(self.names):
            raise ValueError(f"{len(self.names)} members but {len(self.weights)} weights")
        if self.kind not in (LOGISTIC, MEAN):
            raise ValueError(f"unknown stack kind {self.kind!r}")

    @classmethod
    def equal(cls, names: tuple[str, ...] | list[str], n_classes: int) -> Stack:
        return cls(tuple(names), np.full(len(names), 1.0 / max(len(names), 1)), np.zeros(n_classes),
                   fit={"source": "equal weights: too few held-out photos to fit"})

    def logits(self, probs: np.ndarray) -> np.ndarray:
        """``N x C`` for member probabilities ``N x M x C`` (members in :attr:`names` order)."""
        logp = np.log(np.clip(np.asarray(probs, np.float64), FLOOR, 1.0))
        z = np.einsum("nmc,m->nc", logp, self.weights)
        return z + (self.bias if self.bias is not None else 0.0)

    def combine(self, probs: np.ndarray) -> np.ndarray:
        """The aggregate ``N x C`` (float32) of member probabilities ``N x M x C``."""
        p = np.asarray(probs, np.float64)
        if self.kind == MEAN:
            return np.einsum("nmc,m->nc", p, self.shares).astype(np.float32)
        return _softmax(self.logits(p)).astype(np.float32)

    @property
    def shares(self) -> np.ndarray:
        """Each member's share of the weight (sums to 1): what the page, the report and the heatmap show."""
        total = self.weights.sum()
        if total > 0:
            return self.weights / total
        return np.full(len(self.weights), 1.0 / max(len(self.weights), 1))  # equal shares; none for no member

    def share_of(self) -> dict[str, float]:
        return {n: round(float(s), 4) for n, s in zip(self.names, self.shares, strict=True)}

    def state(self) -> dict:
        import torch

        return {"names": list(self.names), "weights": torch.as_tensor(self.weights, dtype=torch.float64),
                "bias": None if self.bias is None else torch.as_tensor(self.bias, dtype=torch.float64),
                "kind": self.kind, "fit": self.fit}

    @classmethod
    def from_state(cls, state: dict) -> Stack:
        bias = state.get("bias")
        return cls(tuple(state["names"]), np.asarray(state["weights"], np.float64),
                   None if bias is None else np.asarray(bias, np.float64), state.get("kind", LOGISTIC),
                   dict(state.get("fit") or {}))


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.asarray(probs)[np.arange(len(labels)), np.asarray(labels)]
    return float(-np.log(np.clip(p, FLOOR, 1.0)).mean())


def fit_stack(probs: np.ndarray, labels: np.ndarray, names: tuple[str, ...] | list[str], source: str = "") -> Stack:
    """The logistic stack of held-out member scores ``N x M x C`` with true ``labels``.

    Returns equal weights (and says so in ``fit``) when there are fewer than :data:`MIN_PHOTOS` photos or one
    class among them.
    """
    from scipy.optimize import minimize

    p = np.asarray(probs, np.float64)
    y = np.asarray(labels, np.int64)
    n, m, c = p.shape
    if n < MIN_PHOTOS or len(np.unique(y)) < 2:
        return Stack.equal(names, c)
    logp = np.log(np.clip(p, FLOOR, 1.0))
    onehot = np.eye(c)[y]
    prior = np.full(m, 1.0 / m)

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[:m], theta[m:]
        z = np.einsum("nmc,m->nc", logp, w) + b
        z -= z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1, keepdims=True))
        loss = float(-(onehot * (z - lse)).sum() / n + RIDGE * ((w ** 2).sum() + (b ** 2).sum()))
        g = np.exp(z - lse) - onehot  # N x C
        grad_w = np.einsum("nc,nmc->m", g, logp) / n + 2 * RIDGE * w
        grad_b = g.sum(axis=0) / n + 2 * RIDGE * b
        return loss, np.concatenate([grad_w, grad_b])

    start = np.concatenate([prior, np.zeros(c)])
    result = minimize(objective, start, jac=True, method="L-BFGS-B",
                      bounds=[(0.0, None)] * m + [(None, None)] * c, options={"maxiter": 500})
    stack = Stack(tuple(names), result.x[:m], result.x[m:], LOGISTIC)
    stack.fit = {"source": source, "photos": int(n), "log_loss": round(log_loss(stack.combine(p), y), 4),
                 "members_log_loss": {name: round(log_loss(p[:, i], y), 4) for i, name in enumerate(names)}}
    return stack

"""The joint ranking of face and phenotype: a conditional logit over the catalogue (:class:`Combiner`) whose
score for each syndrome is a phenotype part plus a face part (facial model or gallery patients)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import optimize, stats

from shared.ml.phenotype.ranking import PhenotypeScores

CATALOGUE_ID = re.compile(r"^(OMIM|ORPHA):(\d{1,7})$", re.IGNORECASE)  # as shared.catalog

PHENOTYPE_FEATURES = ("similarity", "adjusted", "z", "log_rank_similarity", "log_rank_adjusted")
FACE_FEATURES = ("facial_model", "face_log_prob")
# For syndromes without a facial-model class whose diagnosed patients are in the gallery: an indicator, the
# cosine similarity of the nearest such patient (shared.ml.members.gallery's vectors), and -log of that syndrome's
# rank among all gallery syndromes (those with a facial model included) by nearest patient.
GALLERY_FEATURES = ("in_gallery", "gallery_similarity", "gallery_log_rank")
FEATURES = PHENOTYPE_FEATURES + FACE_FEATURES + GALLERY_FEATURES
N_PHENOTYPE = len(PHENOTYPE_FEATURES)
FACE_PROB_FLOOR = 1e-4
Z_CLIP = 10.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, best (highest) first; ties share the mean of their positions."""
    return stats.rankdata(-values, method="average")


def candidate_features(scores: PhenotypeScores, face: np.ndarray | None,
                       gallery: np.ndarray | None = None) -> np.ndarray:
    """``D x len(FEATURES)`` features of every catalogue disease for one case.

    ``face``: ``D`` facial-model probabilities, NaN for syndromes the facial model does not know
    (or ``None``: no photo, no facial model). Those get 0 for both face features.
    ``gallery``: ``D`` cosine similarities of the case's photo to each syndrome's nearest diagnosed
    gallery patient, NaN for syndromes without gallery patients (or ``None``: no gallery). The gallery
    features are set only for syndromes the facial model does not know; their rank is among all
    syndromes with gallery patients.
    """
    d = len(scores.codes)
    x = np.zeros((d, len(FEATURES)))
    x[:, 0] = scores.similarity
    x[:, 1] = scores.adjusted
    x[:, 2] = np.clip(scores.z, -Z_CLIP, Z_CLIP)
    if scores.terms:
        x[:, 3] = -np.log(_ranks(scores.similarity))
        x[:, 4] = -np.log(_ranks(scores.adjusted))
    if face is not None:
        known = ~np.isnan(face)
        x[known, 5] = 1.0
        x[known, 6] = np.log(np.maximum(face[known], FACE_PROB_FLOOR))
    if gallery is not None:
        present = ~np.isnan(gallery)
        only = present & (x[:, 5] == 0)
        if only.any():
            rank = np.zeros(d)
            rank[present] = _ranks(gallery[present])
            x[only, 7] = 1.0
            x[only, 8] = gallery[only]
            x[only, 9] = -np.log(rank[only])
    return x


def _catalogue_vector(codes: np.ndarray, values: dict[str, float] | None) -> tuple[np.ndarray | None, list[str]]:
    """``{code: value}`` (codes in any case, ``omim:147920``) as a ``D`` vector (NaN: absent), and the codes
    outside the catalogue."""
    if not values:
        return None, []
    pos = {c: i for i, c in enumerate(codes.tolist())}
    vec = np.full(len(codes), np.nan)
    ignored = []
    for code, value in values.items():
        m = CATALOGUE_ID.match(str(code).strip())
        key = f"{m.group(1).upper()}:{int(m.group(2))}" if m else None
        if key in pos and value is not None and np.isfinite(float(value)):
            vec[pos[key]] = float(value)
        else:
            ignored.append(code)
    return vec, ignored


@dataclass
class JointRanking:
    """All catalogue diseases, best first, with the parts of each one's score."""

    codes: np.ndarray
    probability: np.ndarray  # softmax of ``score`` over the catalogue
    score: np.ndarray  # phenotype + face (a logit)
    phenotype: np.ndarray  # the phenotype features' contribution to ``score``
    face: np.ndarray  # the face's contribution: facial model or gallery patients (0 where neither)
    facial_model: np.ndarray  # bool: the facial model knows this syndrome
    face_probability: np.ndarray  # the facial model's probability (NaN without a facial model)
    similarity: np.ndarray  # the phenotype similarity (nats)
    ignored_face_classes: list[str] = field(default_factory=list)  # facial classes outside the catalogue
    # Without a facial model: the nearest gallery patient's cosine similarity (NaN: no gallery patients).
    gallery_similarity: np.ndarray | None = None
    ignored_gallery: list[str] = field(default_factory=list)  # gallery syndromes outside the catalogue

    @property
    def face_source(self) -> np.ndarray:
        """Per syndrome, where its face part comes from: ``"facial_model"``, ``"gallery"`` or ``""`` (phenotype
        alone)."""
        gallery = (~np.isnan(self.gallery_similarity) if self.gallery_similarity is not None
                   else np.zeros(len(self.codes), bool))
        return np.where(self.facial_model, "facial_model", np.where(gallery, "gallery", ""))

    def top(self, n: int = 10, names: dict[str, str] | None = None) -> list[dict]:
        out = []
        source = self.face_source
        for i in range(min(n, len(self.codes))):
            g = None if self.gallery_similarity is None else self.gallery_similarity[i]
            row = {"rank": i + 1, "code": str(self.codes[i]), "probability": float(self.probability[i]),
                   "score": float(self.score[i]), "phenotype_part": float(self.phenotype[i]),
                   "face_part": float(self.face[i]), "facial_model": bool(self.facial_model[i]),
                   "face_source": str(source[i]) or None,
                   "face_probability": None if np.isnan(self.face_probability[i]) else float(self.face_probability[i]),
                   "gallery_similarity": None if g is None or np.isnan(g) else float(g),
                   "similarity": float(self.similarity[i])}
            if names is not None:
                row["name"] = names.get(row["code"], "")
            out.append(row)
        return out


class Combiner:
    """A conditional logit over the catalogue: ``score(s) = w . x(s)``, ``P(s) = softmax(score)``.

    ``x(s)`` are the :data:`FEATURES` of syndrome ``s`` for the case (phenotype similarity, its
    calibrated forms and ranks; whether a facial model knows ``s`` and its log-probability; for
    syndromes without one, whether diagnosed gallery patients have it, the nearest one's cosine
    similarity and that syndrome's rank among the gallery's). Combiners saved before a feature
    existed load with a weight of 0 for it. The
    weights are fitted by penalised maximum likelihood of the true syndromes of simulated cases
    (:meth:`fit`); unfitted, every weight is 0 and all syndromes tie. ``features`` restricts the
    model (``PHENOTYPE_FEATURES``: the phenotype alone, recalibrated).
    """

    def __init__(self, weights: dict[str, float] | None = None, features: tuple[str, ...] = FEATURES,
                 meta: dict | None = None):
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown features: {', '.join(unknown)}")
        self.features = tuple(features)
        self.weights = {f: float((weights or {}).get(f, 0.0)) for f in self.features}
        self.meta = dict(meta or {})

    @property
    def vector(self) -> np.ndarray:
        """Weights over all :data:`FEATURES` (0 for the ones this model leaves out)."""
        return np.array([self.weights.get(f, 0.0) for f in FEATURES])

    def scores(self, x: np.ndarray) -> np.ndarray:
        return x @ self.vector

    def fit(self, cases: list[tuple[np.ndarray, int]], l2: float = 1e-2, negatives: int = 200,
            seed: int = 0) -> Combiner:
        """Fit the weights on ``cases``: ``(D x FEATURES matrix, index of the true syndrome)`` each.

        Each case contributes its true syndrome against a candidate set: the ``negatives`` best by
        each phenotype score and every syndrome with a facial model, plus ``negatives`` random
        others weighted to stand for all the rest (a sampled softmax whose normaliser estimates
        the whole catalogue's, so the fitted probabilities stay calibrated over all diseases).
        """
        rng = np.random.default_rng(seed)
        cols = [FEATURES.index(f) for f in self.features]
        sets, offsets = [], []
        for x, true in cases:
            fixed = {int(true)}
            for j in (0, 1):
                fixed.update(np.argpartition(-x[:, j], min(negatives, len(x) - 1))[:negatives].tolist())
            fixed.update(np.flatnonzero((x[:, 5] > 0) | (x[:, 7] > 0)).tolist())
            fixed.discard(int(true))
            fixed = [int(true)] + sorted(fixed)
            rest = np.setdiff1d(np.arange(len(x)), fixed)
            sample = rng.choice(rest, size=min(negatives, len(rest)), replace=False)
            sets.append(x[np.r_[fixed, sample].astype(np.int64)][:, cols])
            # Each sampled syndrome stands for len(rest)/len(sample) of the rest: the normaliser stays unbiased.
            offsets.append(np.r_[np.zeros(len(fixed)), np.full(len(sample), np.log(len(rest) / max(1, len(sample))))])
        width = max(len(s) for s in sets)
        xs = np.zeros((len(sets), width, len(cols)))
        off = np.zeros((len(sets), width))
        mask = np.zeros((len(sets), width), bool)
        for i, (s, o) in enumerate(zip(sets, offsets, strict=True)):
            xs[i, :len(s)] = s
            off[i, :len(s)] = o
            mask[i, :len(s)] = True
        mu = xs[mask].mean(0)
        sd = xs[mask].std(0)
        sd[sd < 1e-9] = 1.0
        xs = np.where(mask[..., None], (xs - mu) / sd, 0.0)
        n = len(sets)

        def loss(w):
            s = np.where(mask, xs @ w + off, -np.inf)
            m = s.max(axis=1, keepdims=True)
            e = np.exp(s - m)
            z = e.sum(axis=1, keepdims=True)
            p = e / z
            nll = -(s[:, 0] - (m[:, 0] + np.log(z[:, 0]))).sum() / n
            grad = -(xs[:, 0] - np.einsum("nk,nkf->nf", p, xs)).sum(0) / n
            return nll + 0.5 * l2 * w @ w, grad + l2 * w

        res = optimize.minimize(loss, np.zeros(len(cols)), jac=True, method="L-BFGS-B")
        w = res.x / sd  # back to the raw features (the centring is a per-case constant and cancels)
        self.weights = {f: float(v) for f, v in zip(self.features, w, strict=True)}
        self.meta.update({"cases": n, "l2": l2, "negatives": negatives, "nll": float(res.fun),
                          "converged": bool(res.success)})
        return self

    # -- ranking --

    def rank(self, scores: PhenotypeScores, face: dict[str, float] | None = None,
             gallery: dict[str, float] | None = None) -> JointRanking:
        """The joint ranking of a case: its :class:`PhenotypeScores`, the facial model's
        ``{catalogue code: probability}`` (``None``: no photo scored) and the gallery's
        ``{catalogue code: cosine similarity of the nearest diagnosed patient}`` (``None``: no
        gallery; syndromes the facial model knows keep their facial score, the others with gallery
        patients get the gallery features)."""
        codes = scores.codes
        vec, ignored = _catalogue_vector(codes, face)
        gvec, ignored_gallery = _catalogue_vector(codes, gallery)
        x = candidate_features(scores, vec, gvec)
        w = self.vector
        pheno = x[:, :N_PHENOTYPE] @ w[:N_PHENOTYPE]
        face_part = x[:, N_PHENOTYPE:] @ w[N_PHENOTYPE:]
        total = pheno + face_part
        prob = np.exp(total - total.max())
        prob /= prob.sum()
        order = np.argsort(-total, kind="stable")
        has_face = x[:, 5] > 0
        fp = vec if vec is not None else np.full(len(codes), np.nan)
        gs = np.where(x[:, 7] > 0, x[:, 8], np.nan)
        return JointRanking(codes[order], prob[order], total[order], pheno[order], face_part[order],
                            has_face[order], fp[order], scores.similarity[order], ignored, gs[order],
                            ignored_gallery)

    # -- persistence --

    def to_dict(self) -> dict:
        return {"kind": "gestalt.phenotype.combiner", "version": 1, "features": list(self.features),
                "weights": dict(self.weights), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> Combiner:
        if data.get("kind") != "gestalt.phenotype.combiner":
            raise ValueError("not a combiner's parameters")
        return cls(data["weights"], tuple(data["features"]), data.get("meta"))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> Combiner:
        return cls.from_dict(json.loads(Path(path).read_text()))

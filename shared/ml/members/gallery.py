"""Gallery matching: the diagnosed patients most similar to a new photo, and syndromes ranked by them.

Every scored photo has its pooled backbone features cached per region (``image_features``).
A photo's gallery vector is the concatenation of its L2-normalised region features, normalised
again, so the cosine of two photos is the mean of their per-region cosines. The gallery holds
the photos of diagnosed cases whose consent allows reuse, under the backbone of the active
model (features of different backbones are not comparable). A patient's similarity is that of
their most similar photo; a syndrome's is that of its most similar patient. This ranks
syndromes the model has no output class for yet, as soon as one patient is diagnosed.

The maths only (numpy in, numpy out); :mod:`shared.modelops.gallery` loads a gallery from the database.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def gallery_vectors(features: np.ndarray) -> np.ndarray:
    """``N x D`` unit vectors from region features ``N x R x F`` (each region normalised, then the whole)."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, None, :]
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    x = x.reshape(len(x), -1)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def unit_concat(parts: list[np.ndarray]) -> np.ndarray:
    """``N x D`` unit vectors from per-name vectors of any sizes (``N x F_i`` each): each part normalised, then the
    whole, so the cosine of two photos is the mean of their per-part cosines (the identity descriptor and each
    region's features count alike)."""
    normed = [np.asarray(p, np.float32) / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-12) for p in parts]
    x = np.concatenate(normed, axis=-1)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def class_scores(similarities: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """``Q x C``: for each query, the similarity of each class's nearest gallery photo (-inf: no photo)."""
    out = np.full((similarities.shape[0], n_classes), -np.inf, dtype=np.float32)
    for c in np.unique(labels):
        out[:, c] = similarities[:, labels == c].max(axis=1)
    return out


def gallery_scores(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                   n_classes: int) -> np.ndarray:
    """Nearest-patient class scores ``N_test x C`` against a gallery of ``train_features`` (benchmarks)."""
    return vector_scores(gallery_vectors(train_features), train_labels, gallery_vectors(test_features), n_classes)


def vector_scores(train_vectors: np.ndarray, train_labels: np.ndarray, test_vectors: np.ndarray,
                  n_classes: int) -> np.ndarray:
    """Nearest-patient class scores ``N_test x C`` of unit vectors against a gallery of unit vectors."""
    return class_scores(np.asarray(test_vectors) @ np.asarray(train_vectors).T, np.asarray(train_labels), n_classes)


@dataclass
class Gallery:
    """Diagnosed, consented photos in one feature space: unit vectors and who they belong to."""

    space: tuple  # the (name, feature key) pairs each vector is made of
    vectors: np.ndarray  # N x D
    image_ids: np.ndarray  # N
    case_ids: np.ndarray  # N
    syndrome_ids: np.ndarray  # N
    syndromes: dict[int, dict] = field(default_factory=dict)  # id -> {"name", "omim", "orpha", "genes"}
    owners: dict[int, int] = field(default_factory=dict)  # case id -> owner user id

    def __len__(self) -> int:
        return len(self.image_ids)

    def match(self, query: np.ndarray, exclude_case: int | None = None, patients: int = 10,
              syndromes: int = 10) -> dict:
        """The ``patients`` most similar patients and the ``syndromes`` best-ranked syndromes for one photo
        (``query``: its unit vector ``D`` in the gallery's space, or several photos' ``P x D`` whose similarities
        are averaged, as one case)."""
        q = np.asarray(query, dtype=np.float32)
        q = q[None] if q.ndim == 1 else q
        keep = self.case_ids != exclude_case if exclude_case is not None else np.ones(len(self), bool)
        if not keep.any():
            return {"patients": [], "syndromes": [], "gallery_patients": 0}
        sims = (q @ self.vectors[keep].T).mean(axis=0)
        cases, synd = self.case_ids[keep], self.syndrome_ids[keep]
        best: dict[int, tuple[float, int]] = {}
        for s, c, y in zip(sims.tolist(), cases.tolist(), synd.tolist(), strict=True):
            if c not in best or s > best[c][0]:
                best[c] = (s, y)
        ranked = sorted(best.items(), key=lambda kv: -kv[1][0])
        by_syndrome: dict[int, tuple[float, int]] = {}
        for c, (s, y) in ranked:
            by_syndrome.setdefault(y, (s, c))
        out_patients = [{"case_id": c, "syndrome_id": y, "similarity": round(s, 4)} for c, (s, y) in ranked[:patients]]
        out_synd = [{"syndrome_id": y, "similarity": round(s, 4), "nearest_case_id": c,
                     "patients": sum(1 for _, (_, yy) in best.items() if yy == y)}
                    for y, (s, c) in list(by_syndrome.items())[:syndromes]]
        for row in out_patients + out_synd:
            row.update({k: v for k, v in self.syndromes.get(row["syndrome_id"], {}).items()})
        return {"patients": out_patients, "syndromes": out_synd, "gallery_patients": len(best)}

    def unusual(self, query: np.ndarray, k: int = 5, reference: int = 500, seed: int = 0,
                exclude_case: int | None = None) -> dict | None:
        """How unlike the gallery's photos a case's photos (``P x D`` unit vectors) are: the mean cosine distance to
        their ``k`` nearest gallery photos, and its percentile among the same distance of gallery photos to the
        others (each photo's own case left out; a sample of ``reference`` photos). None with too few photos."""
        keep = self.case_ids != exclude_case if exclude_case is not None else np.ones(len(self), bool)
        vectors, cases = self.vectors[keep], self.case_ids[keep]
        if len(vectors) <= k:
            return None
        q = np.asarray(query, np.float32)
        q = q[None] if q.ndim == 1 else q
        distance = float(np.mean(1.0 - np.sort(q @ vectors.T, axis=1)[:, -k:]))
        rng = np.random.default_rng(seed)
        sample = rng.choice(len(vectors), size=min(reference, len(vectors)), replace=False)
        sims = vectors[sample] @ vectors.T
        sims[cases[sample][:, None] == cases[None, :]] = -np.inf  # a patient's own photos are not their neighbours
        ref = np.sort(1.0 - np.sort(sims, axis=1)[:, -k:].mean(axis=1))
        ref = ref[np.isfinite(ref)]
        if not len(ref):
            return None
        percentile = 100.0 * np.searchsorted(ref, distance, side="right") / len(ref)
        return {"distance": round(distance, 4), "percentile": round(float(percentile), 1),
                "unusual": bool(percentile >= 99.0)}

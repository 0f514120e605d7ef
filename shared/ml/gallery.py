"""Gallery matching: the diagnosed patients most similar to a new photo, and syndromes ranked by them.

Every scored photo has its pooled backbone features cached per region (``image_features``).
A photo's gallery vector is the concatenation of its L2-normalised region features, normalised
again, so the cosine of two photos is the mean of their per-region cosines. The gallery holds
the photos of diagnosed cases whose consent allows reuse, under the backbone of the active
model (features of different backbones are not comparable). A patient's similarity is that of
their most similar photo; a syndrome's is that of its most similar patient. This ranks
syndromes the model has no output class for yet, as soon as one patient is diagnosed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.ml import heads as hd
from shared.models import Case, Diagnosis, Image, ImageFeature, Syndrome


def gallery_vectors(features: np.ndarray) -> np.ndarray:
    """``N x D`` unit vectors from region features ``N x R x F`` (each region normalised, then the whole)."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim == 2:
        x = x[:, None, :]
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    x = x.reshape(len(x), -1)
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
    sims = gallery_vectors(test_features) @ gallery_vectors(train_features).T
    return class_scores(sims, np.asarray(train_labels), n_classes)


@dataclass
class Gallery:
    """Diagnosed, consented photos under one backbone: unit vectors and who they belong to."""

    backbone_sha: str
    regions: tuple[str, ...]
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
        (``query``: its region features ``R x F``, or several photos ``P x R x F`` whose similarities are
        averaged, as one case)."""
        q = np.asarray(query, dtype=np.float32)
        q = q[None] if q.ndim == 2 else q
        keep = self.case_ids != exclude_case if exclude_case is not None else np.ones(len(self), bool)
        if not keep.any():
            return {"patients": [], "syndromes": [], "gallery_patients": 0}
        sims = (gallery_vectors(q) @ self.vectors[keep].T).mean(axis=0)
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


# Unit vectors per (backbone, regions) and image id. Features of one backbone never change, so each
# process reads a photo's features once; the rows of who is in the gallery are read every time.
_VECTORS: dict[tuple[str, tuple[str, ...]], dict[int, np.ndarray]] = {}


def load_gallery(session: Session, backbone_sha: str, regions: tuple[str, ...] | list[str]) -> Gallery:
    """The gallery for one backbone: scored photos of diagnosed cases with consent, with every region cached."""
    regions = tuple(regions)
    members = session.execute(
        select(Image.id, Image.case_id, Diagnosis.syndrome_id, Case.owner_id)
        .join(Case, Case.id == Image.case_id).join(Diagnosis, Diagnosis.case_id == Case.id)
        .where(Diagnosis.consent.is_(True), Image.status == "done").order_by(Image.id)).all()
    meta = {image_id: (case_id, syndrome_id, owner_id) for image_id, case_id, syndrome_id, owner_id in members}
    cache = _VECTORS.setdefault((backbone_sha, regions), {})
    if len(_VECTORS) > 4:  # models are few; drop the oldest backbones' vectors
        for key in list(_VECTORS)[:-4]:
            del _VECTORS[key]
    missing = [i for i in meta if i not in cache]
    for start in range(0, len(missing), 5000):
        per_image: dict[int, dict] = {}
        for image_id, region, blob in session.execute(
                select(ImageFeature.image_id, ImageFeature.region, ImageFeature.vector)
                .where(ImageFeature.backbone_sha == backbone_sha, ImageFeature.region.in_(regions),
                       ImageFeature.image_id.in_(missing[start:start + 5000]))):
            per_image.setdefault(image_id, {})[region] = hd.unpack(blob)
        full = [i for i, v in per_image.items() if set(v) == set(regions)]
        if full:
            vectors = gallery_vectors(np.stack([np.stack([per_image[i][r] for r in regions]) for i in full]))
            cache.update(zip(full, vectors, strict=True))
    ids = [i for i in meta if i in cache]
    vectors = np.stack([cache[i] for i in ids]) if ids else np.zeros((0, 0), np.float32)
    syndrome_ids = sorted({meta[i][1] for i in ids})
    syndromes = {s.id: {"name": s.name, "omim": s.omim, "orpha": s.orpha, "genes": list(s.genes or [])}
                 for s in session.scalars(select(Syndrome).where(Syndrome.id.in_(syndrome_ids)))} if ids else {}
    return Gallery(backbone_sha, regions, vectors, np.array(ids, dtype=np.int64),
                   np.array([meta[i][0] for i in ids], dtype=np.int64),
                   np.array([meta[i][1] for i in ids], dtype=np.int64), syndromes,
                   {meta[i][0]: meta[i][2] for i in ids})


def case_features(session: Session, case_id: int, backbone_sha: str, regions: tuple[str, ...]) -> np.ndarray:
    """Cached features ``P x R x F`` of a case's scored photos under ``backbone_sha`` (P may be 0)."""
    rows = session.execute(
        select(ImageFeature.image_id, ImageFeature.region, ImageFeature.vector)
        .join(Image, Image.id == ImageFeature.image_id)
        .where(Image.case_id == case_id, Image.status == "done", ImageFeature.backbone_sha == backbone_sha,
               ImageFeature.region.in_(regions)).order_by(ImageFeature.image_id)).all()
    per_image: dict[int, dict] = {}
    for image_id, region, blob in rows:
        per_image.setdefault(image_id, {})[region] = hd.unpack(blob)
    full = [np.stack([v[r] for r in regions]) for v in per_image.values() if set(v) == set(regions)]
    return np.stack(full) if full else np.zeros((0, len(regions), 0), np.float32)

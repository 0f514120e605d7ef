"""Whether two face descriptors are one person: the identity encoder's same-person rule, numpy only.

dlib's face-recognition network (:mod:`shared.ml.nets.encoder`) is trained so that two photos of one person
lie within a Euclidean distance of 0.6 of each other in its 128-d descriptor space (dlib's loss_metric
threshold). The gallery uses it to keep a clinician from learning, by uploading someone's photo, that
the person is another clinician's consented patient and with what diagnosis.
"""
from __future__ import annotations

import numpy as np

# Two chips of one person: Euclidean distance between their descriptors below this.
SAME_PERSON_DISTANCE = 0.6


def same_person(query: np.ndarray, candidates: np.ndarray, threshold: float = SAME_PERSON_DISTANCE) -> np.ndarray:
    """For each candidate descriptor (``N x 128``), whether it lies within ``threshold`` of any of the query's
    descriptors (``Q x 128``, e.g. every photo of one case). Returns ``N`` booleans (all False for no query)."""
    q, c = np.asarray(query, dtype=np.float64), np.asarray(candidates, dtype=np.float64)
    if q.size == 0 or c.size == 0:
        return np.zeros(len(c), bool)
    q = q.reshape(-1, c.shape[-1])
    distances = np.sqrt(np.maximum((q * q).sum(1)[:, None] + (c * c).sum(1)[None] - 2 * q @ c.T, 0.0))
    return (distances < threshold).any(axis=0)

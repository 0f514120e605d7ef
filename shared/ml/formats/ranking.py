"""A model's scores as a ranking of its classes (numpy only: the portal shows rankings without torch)."""
from __future__ import annotations

import numpy as np


def rank(aggregate: np.ndarray, classes: list[dict]) -> list[dict]:
    """All classes, best first, as ``{"rank", "syndrome_id", "name", "score"}``."""
    order = np.argsort(-aggregate, kind="stable")
    scores = np.asarray(aggregate, np.float64)[order].tolist()
    return [{"rank": i + 1, "syndrome_id": classes[j]["syndrome_id"], "name": classes[j]["name"], "score": score}
            for i, (j, score) in enumerate(zip(order.tolist(), scores, strict=True))]

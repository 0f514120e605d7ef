"""A model's scores as a ranking of its classes (numpy only: the portal shows rankings without torch)."""
from __future__ import annotations

import numpy as np


def rank(aggregate: np.ndarray, classes: list[dict]) -> list[dict]:
    """All classes, best first, as ``{"rank", "syndrome_id", "name", "score"}``."""
    order = np.argsort(-aggregate, kind="stable")
    return [{"rank": i + 1, "syndrome_id": classes[j]["syndrome_id"], "name": classes[j]["name"],
             "score": float(aggregate[j])} for i, j in enumerate(order)]

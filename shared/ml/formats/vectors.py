"""Feature vectors as stored bytes (``image_features.vector``): little-endian float32 (numpy only)."""
from __future__ import annotations

import numpy as np


def pack(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype="<f4").tobytes()


def unpack(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype="<f4")

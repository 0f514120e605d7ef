"""The benchmark's photos: ~1 MP sources, distinct JPEGs of them, and the known face of the stand-ins."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

ROOT = Path(__file__).resolve().parents[2]
SHARED_DATA = Path(os.environ.get("GESTALT_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The known face of the stand-ins: box, five points and 68 landmarks, relative to the photo's size.
FACE_ENV = "GESTALT_BENCH_FACE"


def sources(models: str, megapixels: float = 1.0) -> list[np.ndarray]:
    """RGB sources of ~1 MP: the astronaut, plus the shared people photos for real models.

    The stand-ins know one face, so the other modes upload astronaut variants only."""
    side = int(round(1000 * megapixels ** 0.5))
    out = [np.asarray(Image.fromarray(data.astronaut()).resize((side, side)))]
    people = SHARED_DATA / "faces" / "people"
    if models == "real" and people.exists():
        for path in sorted(people.glob("img*.jpg"))[:20]:
            im = Image.open(path).convert("RGB")
            scale = (megapixels * 1e6 / (im.width * im.height)) ** 0.5
            out.append(np.asarray(im.resize((int(im.width * scale), int(im.height * scale)))))
    return out


def distinct_jpegs(srcs: list[np.ndarray], n: int, offset: int = 0) -> list[bytes]:
    """``n`` JPEGs that all differ (a few corner pixels carry the index): no two uploads share a hash."""
    out = []
    for i in range(n):
        rgb = srcs[i % len(srcs)].copy()
        k = i + offset
        rgb[:2, :2] = (k & 255, (k >> 8) & 255, (k >> 16) & 255)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def known_face(rgb: np.ndarray) -> dict:
    """The astronaut's face, found once by the offline backends, relative to the photo's size."""
    from shared.ml.preprocess.pipeline import Preprocessor

    pre = Preprocessor(detector="mediapipe", landmarker="mediapipe")
    try:
        found = pre.run(rgb)
    finally:
        pre.close()
    h, w = rgb.shape[:2]
    scale = np.array([w, h], np.float64)
    box = np.array(found.face.box).reshape(2, 2) / scale
    return {"box": box.ravel().tolist(), "points": (np.array(found.face.points) / scale).tolist(),
            "landmarks": (found.aligned.landmarks / scale).tolist()}

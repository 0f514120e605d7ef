"""On-disk cache of preprocessing results, so that train and evaluate find each face once.

One file per photo and preprocessing setup: the key is the sha256 of the photo's bytes together with
the detector and landmark backends (names and weights' sha256), the face-confidence threshold, the
regions and :data:`FORMAT`. An entry holds the region crops (uint8), the aligned grayscale face,
its landmarks on the aligned canvas, the identity encoder's face chip and the regions cut at the
encoder's size, or the reason the photo
was rejected. The folder is created 0700 and entries are written 0600 (they are face images),
atomically, so parallel runs may share it.
A damaged entry is treated as a miss and rewritten.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

# Bump when what is stored, or how preprocessing computes it, changes.
FORMAT = 4  # 2: entries keep the face chip; 3: the gate grades turned faces (3D head pose) instead of
# refusing; 4: and the regions cut at the encoder's size
DEFAULT_SUBDIR = "prep-cache"


@dataclass
class CachedFace:
    crops: np.ndarray  # R x 100 x 100 uint8, in the cache's region order
    aligned: np.ndarray  # canvas x canvas uint8 grayscale
    landmarks: np.ndarray  # L x 2 float32 on the aligned canvas
    chip: np.ndarray | None = None  # 150 x 150 x 3 uint8, the identity encoder's input
    cuts: np.ndarray | None = None  # 4 x 150 x 150 x 3 uint8, the paper's regions cut at the encoder's size


@dataclass
class CachedRejection:
    reason: str


class PrepCache:
    """Preprocessing results keyed by photo hash and preprocessing setup."""

    def __init__(self, root: Path, setup: dict):
        self.root = Path(root)
        self.setup = {"format": FORMAT, **setup}
        self.setup_key = hashlib.sha256(json.dumps(self.setup, sort_keys=True).encode()).hexdigest()[:16]
        self.hits = 0
        self.misses = 0
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.root, 0o700)  # mkdir's mode is masked by the umask

    @classmethod
    def for_preprocessor(cls, root: Path, preprocessor) -> PrepCache:
        return cls(root, {**preprocessor.provenance, "regions": list(preprocessor.regions),
                          "min_confidence": float(preprocessor.min_confidence)})

    def path(self, photo_sha256: str) -> Path:
        key = hashlib.sha256(f"{photo_sha256}:{self.setup_key}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.npz"

    def get(self, photo_sha256: str) -> CachedFace | CachedRejection | None:
        path = self.path(photo_sha256)
        try:
            with np.load(path, allow_pickle=False) as z:
                if "reason" in z.files:
                    entry = CachedRejection(str(z["reason"]))
                else:
                    entry = CachedFace(z["crops"], z["aligned"], z["landmarks"], z["chip"], z["cuts"])
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError, EOFError) as exc:
            logger.warning("damaged preprocessing cache entry %s (%s); recomputing", path, exc)
            self.misses += 1
            return None
        self.hits += 1
        return entry

    def put(self, photo_sha256: str, entry: CachedFace | CachedRejection) -> None:
        path = self.path(photo_sha256)
        buf = io.BytesIO()
        if isinstance(entry, CachedRejection):
            np.savez(buf, reason=np.array(entry.reason))
        else:
            np.savez_compressed(buf, crops=np.asarray(entry.crops, np.uint8),
                                aligned=np.asarray(entry.aligned, np.uint8),
                                landmarks=np.asarray(entry.landmarks, np.float32),
                                chip=np.asarray(entry.chip, np.uint8), cuts=np.asarray(entry.cuts, np.uint8))
        try:
            if not path.parent.is_dir():
                path.parent.mkdir(exist_ok=True, mode=0o700)
                os.chmod(path.parent, 0o700)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npz")  # created 0600
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(buf.getvalue())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:  # a full or read-only disk costs speed, not the run
            logger.warning("could not write preprocessing cache entry %s: %s", path, exc)

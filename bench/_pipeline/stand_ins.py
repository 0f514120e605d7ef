"""Stand-ins for the worker's networks, installed in the benchmark's worker processes only (``--serve-worker``).

They answer with the benchmark photo's known face (:data:`photos.FACE_ENV`); in the
random-production mode the real networks run first, for their cost.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .photos import FACE_ENV


class KnownFaceDetector:
    """Answers with the known face; ``inner`` (a real network) runs first when given, for its cost."""

    def __init__(self, face: dict, inner=None):
        self.face, self.inner = face, inner
        self.name = inner.name if inner is not None else "bench-null-detector"
        self.weights_sha256 = inner.weights_sha256 if inner is not None else "null"

    def detect_batch(self, images: list[np.ndarray]) -> list:
        from shared.ml.preprocess.detection import DetectedFace

        if self.inner is not None:
            self.inner.detect_batch(images)
        out = []
        for rgb in images:
            s = np.array([rgb.shape[1], rgb.shape[0]], np.float64)
            box = (np.array(self.face["box"]).reshape(2, 2) * s).ravel()
            points = np.array(self.face["points"]) * s
            out.append([DetectedFace(tuple(float(c) for c in box), 0.99, tuple(map(tuple, points.tolist())))])
        return out

    def detect(self, rgb: np.ndarray) -> list:
        return self.detect_batch([rgb])[0]

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


class KnownFaceLandmarks:
    def __init__(self, face: dict, inner=None):
        self.face, self.inner = face, inner
        self.name = inner.name if inner is not None else "bench-null-landmarks"
        self.weights_sha256 = inner.weights_sha256 if inner is not None else "null"

    def landmarks_batch(self, images: list[np.ndarray], boxes: list[tuple]) -> list:
        if self.inner is not None:
            self.inner.landmarks_batch(images, boxes)
        return [np.array(self.face["landmarks"]) * np.array([rgb.shape[1], rgb.shape[0]], np.float64)
                for rgb in images]

    def landmarks(self, rgb: np.ndarray, box: tuple) -> np.ndarray:
        return self.landmarks_batch([rgb], [box])[0]

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def _null_ensemble() -> None:
    """The regional CNNs answer zero logits and features without arithmetic."""
    import torch

    from shared.ml.nets.ensemble import RegionalEnsemble

    def null_forward(self, x):  # N x R x 1 x H x W -> zero logits and features, no arithmetic
        n, r = x.shape[0], len(self.regions)
        feats = getattr(self, "_bench_features", None)
        if feats is None:
            feats = self._bench_features = next(iter(self.nets.values())).num_features
        return torch.zeros(n, r, self.num_classes), torch.zeros(n, r, feats)

    RegionalEnsemble.forward_with_features = null_forward


def install_stand_ins(models: str) -> None:
    """Replace the worker's networks in this process (a Celery parent: its forks inherit the patch).

    The preprocessor is built on first use, in the child (CUDA and mediapipe do not survive a fork)."""
    from worker.stages import resources

    face = json.loads(os.environ[FACE_ENV])
    if models == "null":
        _null_ensemble()
    built = []

    def preprocessor():
        if not built:
            from shared.config import get_settings
            from shared.ml.preprocess.pipeline import Preprocessor
            from shared.ml.preprocess.regions import ALL_REGIONS

            inner = Preprocessor.from_settings(get_settings(), regions=ALL_REGIONS) \
                if models == "random-production" else None
            pre = Preprocessor.__new__(Preprocessor)
            pre.min_confidence = 0.5
            pre.regions = ALL_REGIONS
            pre.detector = KnownFaceDetector(face, inner.detector if inner else None)
            pre.mesh = KnownFaceLandmarks(face, inner.mesh if inner else None)
            built.append(pre)
        return built[0]

    # The pipeline's stages look the preprocessor up in worker.stages.resources.
    resources.preprocessor = preprocessor


def serve_worker(models: str, celery_args: list[str]) -> None:
    from pathlib import Path

    from worker.celery_app import app

    from .profiling import PROFILE_ENV, install

    if os.environ.get(PROFILE_ENV):
        install(Path(os.environ[PROFILE_ENV]))
    install_stand_ins(models)
    app.worker_main(["worker", "--loglevel=INFO", *celery_args])

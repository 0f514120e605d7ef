"""The face detector and landmark backends, registered in one place.

A backend is a class in :mod:`shared.ml.preprocess.detection` or :mod:`shared.ml.preprocess.landmarks` that follows
:class:`Detector` or :class:`Landmarker`, plus one :class:`Backend` entry below: how to build it,
which weight files it needs, and whether those are present. The settings
(``GESTALT_DETECTOR``, ``GESTALT_LANDMARKER``), the CLI's choices, ``auto`` (the
first registered backend whose weights are present) and the workers' start-up check all read
these registries, so a new backend touches its own module and this one.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shared.ml.formats.weights import WEIGHTS_BY_KEY, locate, require
from shared.ml.preprocess.detection import (
    RETINAFACE_WEIGHTS,
    DetectedFace,
    MediaPipeDetector,
    RetinaFaceDetector,
    retinaface_variant,
)
from shared.ml.preprocess.landmarks import FANLandmarks, MediaPipeMesh


class Detector(Protocol):
    name: str
    weights_sha256: str

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]: ...

    def detect_batch(self, images: list[np.ndarray]) -> list[list[DetectedFace]]: ...

    def close(self) -> None: ...


class Landmarker(Protocol):
    name: str
    weights_sha256: str

    def landmarks(self, rgb: np.ndarray, box: tuple) -> np.ndarray | None: ...

    def landmarks_batch(self, images: list[np.ndarray], boxes: list[tuple]) -> list[np.ndarray | None]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Backend:
    """How to build one backend. ``create(min_confidence, device, verify)``; ``weights()`` names the files
    in :data:`shared.ml.formats.weights.WEIGHTS_BY_KEY` it needs now (none for models inside a wheel)."""

    create: Callable[[float, str, bool], object]
    weights: Callable[[], tuple[str, ...]] = tuple
    describe: Callable[[], str] | None = None

    def present(self) -> bool:
        return all(locate(WEIGHTS_BY_KEY[key]) for key in self.weights())

    def check(self, name: str, verify: bool) -> str:
        """The backend's description after checking its weights (raises ``WeightsMissing``)."""
        for key in self.weights():
            require(WEIGHTS_BY_KEY[key], verify)
        return self.describe() if self.describe else name


# Production backends first: ``auto`` takes the first whose weights are present.
DETECTORS: dict[str, Backend] = {
    "retinaface": Backend(
        create=lambda conf, device, verify: RetinaFaceDetector(retinaface_variant(), conf, device, verify=verify),
        weights=lambda: (RETINAFACE_WEIGHTS[retinaface_variant()],),
        describe=lambda: f"retinaface ({retinaface_variant()})"),
    "mediapipe": Backend(create=lambda conf, device, verify: MediaPipeDetector(conf)),
}
LANDMARKERS: dict[str, Backend] = {
    "fan": Backend(create=lambda conf, device, verify: FANLandmarks(device, verify=verify), weights=lambda: ("fan",)),
    "mediapipe": Backend(create=lambda conf, device, verify: MediaPipeMesh()),
}
# ``auto`` means the production backend only when its best weights are there (the RetinaFace ResNet-50;
# the MobileNet is for tests and small machines, chosen by naming the backend).
AUTO_WEIGHTS = {"retinaface": ("retinaface_resnet50",), "fan": ("fan",)}


def _resolve(kind: str, name: str, registry: dict[str, Backend]) -> str:
    if name == "auto":
        for candidate in registry:
            needs = AUTO_WEIGHTS[candidate] if candidate in AUTO_WEIGHTS else registry[candidate].weights()
            if all(locate(WEIGHTS_BY_KEY[key]) for key in needs):
                return candidate
        return list(registry)[-1]
    if name not in registry:
        raise ValueError(f"unknown {kind} backend {name!r}; use auto, {', '.join(registry)}")
    return name


def resolve(detector: str = "auto", landmarker: str = "auto") -> tuple[str, str]:
    """``auto`` becomes the production backend when its weights are present, else the offline one."""
    return _resolve("detector", detector, DETECTORS), _resolve("landmark", landmarker, LANDMARKERS)

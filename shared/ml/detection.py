"""Face detection. Detection returns boxes and scores; cropping lives elsewhere.

The offline backend is mediapipe 0.10.21's bundled BlazeFace (full range), which
needs no downloaded weights.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

logger = logging.getLogger(__name__)

# Faces that fill the whole frame (passport crops, small clinical photos) are often
# missed by the full-range model; a second pass on a padded canvas finds them.
PAD_FRACTION = 0.25
# Small photos are also upscaled for that pass, so the face meets the model's anchor sizes.
SMALL_SIDE = 400


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    score: float

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


class MediaPipeDetector:
    """BlazeFace full range from the mediapipe wheel. One instance per process (not fork-safe)."""

    name = "mediapipe-blazeface-full"

    def __init__(self, min_confidence: float = 0.5):
        import mediapipe as mp

        self.min_confidence = min_confidence
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_confidence)

    def _run(self, rgb: np.ndarray) -> list[DetectedFace]:
        h, w = rgb.shape[:2]
        result = self._detector.process(np.ascontiguousarray(rgb))
        faces = []
        for det in result.detections or []:
            rel = det.location_data.relative_bounding_box
            x0, y0 = rel.xmin * w, rel.ymin * h
            faces.append(DetectedFace((x0, y0, x0 + rel.width * w, y0 + rel.height * h), float(det.score[0])))
        return faces

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        """All confident faces, in image pixels.

        Args:
            rgb: H x W x 3 uint8 image.
        """
        faces = self._run(rgb)
        if faces:
            return faces
        h, w = rgb.shape[:2]
        scale = 2 if max(h, w) < SMALL_SIDE else 1
        canvas = cv2.resize(rgb, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC) if scale > 1 else rgb
        pad = int(PAD_FRACTION * max(h, w) * scale)
        padded = np.pad(canvas, ((pad, pad), (pad, pad), (0, 0)), mode="constant")
        return [DetectedFace(tuple((c - pad) / scale for c in f.box), f.score) for f in self._run(padded)]

    def close(self) -> None:
        self._detector.close()


def choose_main_face(faces: list[DetectedFace], min_confidence: float) -> DetectedFace | None:
    """The largest confident face, or None."""
    confident = [f for f in faces if f.score >= min_confidence]
    return max(confident, key=lambda f: f.area, default=None)

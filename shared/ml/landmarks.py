"""Facial landmarks: mediapipe's bundled 468-point FaceMesh, run on the detected face."""
from __future__ import annotations

import numpy as np

# FaceMesh indices. "Left"/"right" are as seen in the image (the subject's right eye is on the left).
EYE_LEFT = (33, 133, 159, 145, 160, 144, 158, 153)
EYE_RIGHT = (263, 362, 386, 374, 387, 373, 385, 380)
NOSE_TIP = 1
MOUTH_LEFT = 61
MOUTH_RIGHT = 291

# The face box is widened by this factor so the mesh sees the whole head.
CONTEXT = 1.8


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners (5 x 2) from the 468-point mesh."""
    return np.stack([
        landmarks[list(EYE_LEFT)].mean(axis=0),
        landmarks[list(EYE_RIGHT)].mean(axis=0),
        landmarks[NOSE_TIP],
        landmarks[MOUTH_LEFT],
        landmarks[MOUTH_RIGHT],
    ]).astype(np.float64)


class MediaPipeMesh:
    """FaceMesh (468 points) from the mediapipe wheel. One instance per process."""

    name = "mediapipe-facemesh-468"

    def __init__(self, min_confidence: float = 0.3):
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=1, refine_landmarks=False,
            min_detection_confidence=min_confidence)

    def landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """468 x 2 landmarks in image pixels for the face in ``box``, or None.

        The mesh runs on a square window around the box (padded where it leaves the
        image), so that other faces and a large background do not distract it.
        """
        h, w = rgb.shape[:2]
        x0, y0, x1, y1 = box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        side = max(x1 - x0, y1 - y0) * CONTEXT
        wx0, wy0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        wx1, wy1 = wx0 + int(round(side)), wy0 + int(round(side))
        window = np.zeros((wy1 - wy0, wx1 - wx0, 3), np.uint8)
        sx0, sy0, sx1, sy1 = max(wx0, 0), max(wy0, 0), min(wx1, w), min(wy1, h)
        if sx1 <= sx0 or sy1 <= sy0:
            return None
        window[sy0 - wy0:sy1 - wy0, sx0 - wx0:sx1 - wx0] = rgb[sy0:sy1, sx0:sx1]
        result = self._mesh.process(window)
        if not result.multi_face_landmarks:
            return None
        ww, wh = window.shape[1], window.shape[0]
        pts = np.array([(p.x * ww + wx0, p.y * wh + wy0) for p in result.multi_face_landmarks[0].landmark])
        return pts

    def close(self) -> None:
        self._mesh.close()

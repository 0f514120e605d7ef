"""Facial landmarks in one 68-point scheme, whatever backend produced them.

Two backends:

* ``fan``: face-alignment's 2D-FAN-4 (68 points natively), weights from the weights folder
  (``shared.ml.formats.weights``). Batched on a GPU.
* ``mediapipe``: FaceMesh (468 points) from the mediapipe wheel, mapped onto the 68-point
  scheme with :data:`MESH_TO_68`. Works offline.

The 68-point scheme (0-based): jaw 0-16, brows 17-26, nose bridge 27-30, nostrils 31-35,
eyes 36-41 and 42-47 (outer corner first, clockwise), outer lips 48-59, inner lips 60-67.
"Left" and "right" are as seen in the image: points 36-41 are the subject's right eye.
"""
from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np

from shared.ml.formats.weights import WEIGHTS_BY_KEY, mediapipe_model_sha, require, sha256_of

logger = logging.getLogger(__name__)

# FaceMesh vertex for each of the 68 points, chosen on the mesh's canonical face and checked
# on real photos (docs/regions.png draws them). Jaw points follow the mesh's face oval.
MESH_TO_68 = np.array([
    # jaw 0-16, from the image-left temple down to the chin and up to the image-right temple
    127, 234, 93, 132, 58, 172, 136, 150, 152, 379, 365, 397, 288, 361, 323, 454, 356,
    # brows 17-21 (image left), 22-26 (image right)
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    # nose bridge 27-30, nostrils 31-35
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    # image-left eye 36-41, image-right eye 42-47
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    # outer lips 48-59, inner lips 60-67
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181, 78, 82, 13, 312, 308, 317, 14, 87,
])
assert len(MESH_TO_68) == 68  # noqa: S101 (a module invariant)

EYE_LEFT = slice(36, 42)
EYE_RIGHT = slice(42, 48)
NOSE_TIP = 30
MOUTH_LEFT = 48
MOUTH_RIGHT = 54

# The face box is widened by this factor so the landmark model sees the whole head.
CONTEXT = 1.8


def five_points(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners (5 x 2) from 68 points."""
    pts = np.asarray(landmarks, np.float64)
    return np.stack([pts[EYE_LEFT].mean(axis=0), pts[EYE_RIGHT].mean(axis=0),
                     pts[NOSE_TIP], pts[MOUTH_LEFT], pts[MOUTH_RIGHT]])


def square_window(rgb: np.ndarray, box: tuple[float, float, float, float],
                  context: float = CONTEXT) -> tuple[np.ndarray, int, int]:
    """A square crop around ``box`` widened by ``context``, zero-padded where it leaves the image.

    Returns the window and the image coordinates of its top-left corner.
    """
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = box
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    side = max(int(round(max(x1 - x0, y1 - y0) * context)), 8)
    wx0, wy0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    window = np.zeros((side, side, 3), np.uint8)
    sx0, sy0, sx1, sy1 = max(wx0, 0), max(wy0, 0), min(wx0 + side, w), min(wy0 + side, h)
    if sx1 > sx0 and sy1 > sy0:
        window[sy0 - wy0:sy1 - wy0, sx0 - wx0:sx1 - wx0] = rgb[sy0:sy1, sx0:sx1]
    return window, wx0, wy0


class MediaPipeMesh:
    """FaceMesh (468 points) from the mediapipe wheel, mapped to 68 points. One instance per process."""

    name = "mediapipe-facemesh-468"

    def __init__(self, min_confidence: float = 0.3):
        import mediapipe as mp

        self._mesh = mp.solutions.face_mesh.FaceMesh(
            static_image_mode=True, max_num_faces=1, refine_landmarks=False,
            min_detection_confidence=min_confidence)
        self.weights_sha256 = mediapipe_model_sha("face_landmark")

    def mesh(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """The 468 mesh vertices (x, y, z) in image pixels for the face in ``box``, or None.

        z is FaceMesh's depth, on the scale of x, larger away from the camera. The mesh runs
        on a square window around the box, so that other faces and a large background do
        not distract it.
        """
        window, wx0, wy0 = square_window(rgb, box)
        if not window.any():
            return None
        result = self._mesh.process(window)
        if not result.multi_face_landmarks:
            return None
        side = window.shape[0]
        return np.array([(v.x * side + wx0, v.y * side + wy0, v.z * side)
                         for v in result.multi_face_landmarks[0].landmark])

    def landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        """68 x 2 landmarks in image pixels for the face in ``box``, or None."""
        vertices = self.mesh(rgb, box)
        return None if vertices is None else vertices[MESH_TO_68, :2]

    def landmarks_batch(self, images: list[np.ndarray], boxes: list[tuple]) -> list[np.ndarray | None]:
        return [self.landmarks(rgb, box) for rgb, box in zip(images, boxes, strict=True)]

    def close(self) -> None:
        self._mesh.close()


class FANLandmarks:
    """face-alignment's 2D-FAN-4 (68 points), batched; weights from the weights folder.

    Pre- and post-processing are face-alignment's own (``crop`` to 256 px around the
    box, heat-map argmax with sub-pixel refinement in ``get_preds_fromhm``).
    """

    name = "fan-2d-68"
    # face-alignment's constant relating a box's size to its crop scale, for RetinaFace-like boxes.
    REFERENCE_SCALE = 165.0

    def __init__(self, device: str = "cpu", path: str | None = None, verify: bool = True):
        import torch
        from face_alignment.models import FAN

        self.device = device
        weight = WEIGHTS_BY_KEY["fan"]
        file = path or require(weight, verify)
        self.weights_sha256 = sha256_of(Path(file))
        net = FAN(4)
        net.load_state_dict(torch.load(file, map_location="cpu", weights_only=True))
        self.net = net.to(device).eval()
        self.dtype = torch.float16 if device.startswith("cuda") else torch.float32
        if self.dtype != torch.float32:
            self.net = self.net.to(dtype=self.dtype)

    def landmarks_batch(self, images: list[np.ndarray], boxes: list[tuple]) -> list[np.ndarray | None]:
        import torch
        from face_alignment.utils import CENTER_Y_OFFSET, crop, get_preds_fromhm

        if not images:
            return []
        centers, scales, crops = [], [], []
        for rgb, (x0, y0, x1, y1) in zip(images, boxes, strict=True):
            center = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0 - (y1 - y0) * CENTER_Y_OFFSET])
            scale = ((x1 - x0) + (y1 - y0)) / self.REFERENCE_SCALE
            centers.append(center)
            scales.append(scale)
            crops.append(crop(rgb, center, scale))  # 256 x 256 x 3 uint8
        # uint8 crosses to the device (a quarter of float32's bytes) and is scaled there.
        batch = torch.from_numpy(np.stack(crops)).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        batch = batch.to(self.dtype) / 255.0
        with torch.inference_mode():
            heat = self.net(batch)
            if isinstance(heat, list):
                heat = heat[-1]
        heat = heat.float().cpu().numpy()
        out = []
        for i in range(len(images)):
            _, pts_img, _ = get_preds_fromhm(heat[i:i + 1], centers[i], scales[i])
            pts = np.asarray(pts_img, np.float64).reshape(68, 2)
            out.append(pts if np.isfinite(pts).all() else None)
        return out

    def landmarks(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray | None:
        return self.landmarks_batch([rgb], [box])[0]

    def close(self) -> None:
        self.net = None


def draw_landmarks(rgb: np.ndarray, landmarks: np.ndarray, box: tuple | None = None) -> np.ndarray:
    """A copy of the image with the 68 points (and the box) drawn, for overlays and the CLI."""
    out = np.ascontiguousarray(rgb.copy())
    radius = max(1, int(round(max(out.shape[:2]) / 300)))
    if box is not None:
        x0, y0, x1, y1 = (int(round(c)) for c in box)
        cv2.rectangle(out, (x0, y0), (x1, y1), (255, 200, 0), radius)
    for x, y in np.asarray(landmarks):
        cv2.circle(out, (int(round(x)), int(round(y))), radius + 1, (0, 255, 0), -1, lineType=cv2.LINE_AA)
    return out

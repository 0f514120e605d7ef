"""Head pose from 68 landmarks: yaw, pitch and roll of a 3D mean face fitted to them (``cv2.solvePnP``).

The mean face (:data:`MEAN_FACE`) is 68 points in the scheme of :mod:`~shared.ml.preprocess.landmarks`,
in units of the inter-ocular distance: x to the image's right, y down, z away from the camera,
origin between the eyes. It is the mean of FaceMesh's own 3D landmarks (the 68 vertices of
``landmarks.MESH_TO_68``, x, y and z) on the 400 frontal portraits of the ORL database (40 adults),
each scaled to one inter-ocular distance, rotated onto their common mean (generalised Procrustes),
made left-right symmetric and turned so that its plane of symmetry is the y-z plane; the pitch
of zero is the mean head position of people facing the camera. ``docs/make_mean_face.py`` rebuilds it.

Pose: the rotation ``R = Rz(roll) Ry(yaw) Rx(pitch)`` that takes the mean face into the camera's
frame, in degrees. Positive yaw: the face turned towards the image's left; positive pitch: the chin
raised; positive roll: the face turned clockwise as shown. The camera looks at the centre of the
fitted points with a focal length of :data:`FOCAL_IOD` inter-ocular distances (as if photographed
from about 75 cm), so yaw and pitch do not change when the landmarks are moved, scaled or turned
in the image plane: the pose of a photo's landmarks and of the same landmarks on the aligned
canvas differ only in roll.

Only points that sit on the skull's rigid parts are fitted (:data:`FIT_POINTS`: eyes, nose, and the
brows' and mouth's corners): the jaw line of a 2D landmark model (FAN) follows the visible outline,
which slides over the face as it turns, and the lips and brows move with expression.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

# 68 x 3, inter-ocular distances (see the module doc).
MEAN_FACE = np.array([
    [-1.084, 0.053, 0.818], [-1.072, 0.266, 0.898], [-1.060, 0.483, 0.914], [-1.030, 0.715, 0.882],
    [-0.963, 0.959, 0.801], [-0.866, 1.153, 0.652], [-0.754, 1.297, 0.487], [-0.610, 1.425, 0.352],
    [0.000, 1.671, 0.033], [0.610, 1.425, 0.352], [0.754, 1.297, 0.487], [0.866, 1.153, 0.652],
    [0.963, 0.959, 0.801], [1.030, 0.715, 0.882], [1.060, 0.483, 0.914], [1.072, 0.266, 0.898],
    [1.084, 0.053, 0.818], [-0.887, -0.218, 0.045], [-0.789, -0.300, -0.089], [-0.637, -0.344, -0.195],
    [-0.442, -0.337, -0.287], [-0.224, -0.315, -0.333], [0.224, -0.315, -0.333], [0.442, -0.337, -0.287],
    [0.637, -0.344, -0.195], [0.789, -0.300, -0.089], [0.887, -0.218, 0.045], [0.000, -0.071, -0.308],
    [0.000, 0.148, -0.448], [0.000, 0.355, -0.613], [0.000, 0.484, -0.648], [-0.206, 0.610, -0.307],
    [-0.120, 0.671, -0.337], [0.000, 0.674, -0.363], [0.120, 0.671, -0.337], [0.206, 0.610, -0.307],
    [-0.706, -0.009, 0.042], [-0.599, -0.063, -0.064], [-0.436, -0.074, -0.092], [-0.273, 0.009, -0.042],
    [-0.412, 0.040, -0.071], [-0.574, 0.040, -0.043], [0.273, 0.009, -0.042], [0.436, -0.074, -0.092],
    [0.599, -0.063, -0.064], [0.706, -0.009, 0.042], [0.574, 0.040, -0.043], [0.412, 0.040, -0.071],
    [-0.421, 0.976, -0.020], [-0.249, 0.894, -0.273], [-0.123, 0.873, -0.334], [0.000, 0.889, -0.347],
    [0.123, 0.873, -0.334], [0.249, 0.894, -0.273], [0.421, 0.976, -0.020], [0.231, 1.128, -0.193],
    [0.123, 1.165, -0.238], [0.000, 1.176, -0.246], [-0.123, 1.165, -0.238], [-0.231, 1.128, -0.193],
    [-0.364, 0.972, -0.049], [-0.096, 0.970, -0.242], [0.000, 0.974, -0.256], [0.096, 0.970, -0.242],
    [0.364, 0.972, -0.049], [0.101, 1.032, -0.217], [0.000, 1.037, -0.231], [-0.101, 1.032, -0.217],
])
# Each point's mirror image across the face's midline.
MIRROR = np.array([*range(16, -1, -1), *range(26, 16, -1), 27, 28, 29, 30, 35, 34, 33, 32, 31,
                   45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40, 54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,
                   64, 63, 62, 61, 60, 67, 66, 65])
# Eyes (36-47), nose bridge and nostrils (27-35), brows' ends (17, 21, 22, 26), mouth corners (48, 54).
FIT_POINTS = np.array([*range(27, 48), 17, 21, 22, 26, 48, 54])
FOCAL_IOD = 12.0


@dataclass(frozen=True)
class HeadPose:
    yaw: float  # degrees
    pitch: float
    roll: float
    fit_error: float  # RMS distance of the fitted points from the posed mean face, in inter-ocular distances


def euler(rotation: np.ndarray) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees of ``R = Rz(roll) Ry(yaw) Rx(pitch)``."""
    r = np.asarray(rotation, np.float64)
    yaw = np.degrees(np.arcsin(np.clip(-r[2, 0], -1.0, 1.0)))
    pitch = np.degrees(np.arctan2(r[2, 1], r[2, 2]))
    roll = np.degrees(np.arctan2(r[1, 0], r[0, 0]))
    return float(yaw), float(pitch), float(roll)


def rotation(yaw: float = 0.0, pitch: float = 0.0, roll: float = 0.0) -> np.ndarray:
    """``Rz(roll) Ry(yaw) Rx(pitch)`` from degrees (the inverse of :func:`euler`)."""
    y, p, r = np.radians([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), -np.sin(p)], [0, np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def head_pose(landmarks: np.ndarray) -> HeadPose | None:
    """The pose of the face whose 68 landmarks (image pixels, any scale) are given; None when no fit exists."""
    points = np.asarray(landmarks, np.float64)[FIT_POINTS, :2]
    if points.shape != (len(FIT_POINTS), 2) or not np.isfinite(points).all():
        return None
    iod = float(np.hypot(*(points[36 - 27:42 - 27].mean(axis=0) - points[42 - 27:48 - 27].mean(axis=0))))
    if iod < 1e-6:
        return None
    centre = points.mean(axis=0)
    focal = FOCAL_IOD * iod
    camera = np.array([[focal, 0, centre[0]], [0, focal, centre[1]], [0, 0, 1]], np.float64)
    model = MEAN_FACE[FIT_POINTS] - MEAN_FACE[FIT_POINTS].mean(axis=0)  # the camera looks at its centre
    ok, rvec, tvec = cv2.solvePnP(model, points, camera, None, flags=cv2.SOLVEPNP_SQPNP)
    if not ok or not np.isfinite(rvec).all():
        return None
    rvec, tvec = cv2.solvePnPRefineLM(model, points, camera, None, rvec, tvec)
    projected = cv2.projectPoints(model, rvec, tvec, camera, None)[0].reshape(-1, 2)
    error = float(np.sqrt(((projected - points) ** 2).sum(axis=1).mean()) / iod)
    return HeadPose(*euler(cv2.Rodrigues(rvec)[0]), fit_error=error)

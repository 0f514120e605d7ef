"""Print the 3D mean face of shared/ml/preprocess/pose.py (``MEAN_FACE``) from FaceMesh's own 3D landmarks.

Every ORL portrait (``../shared/data/faces/orl``, 400 photos of 40 adults facing the camera) is
run through the offline backends; FaceMesh's x, y and depth of the 68 points (``MESH_TO_68``) are
centred and scaled to one inter-ocular distance, rotated onto their common mean (generalised
Procrustes, then the mean is turned back onto the photos' average orientation, so that the pose of
people facing the camera is zero), made left-right symmetric (``MIRROR``) and turned so that the
plane of symmetry is x = 0. The origin is between the eyes.

Run: ``GESTALT_SHARED_DATA=../shared/data .venv/bin/python docs/make_mean_face.py`` and paste the
rows into ``MEAN_FACE``.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from shared.ml.preprocess.frames import Frame
from shared.ml.preprocess.imaging import ImageRejected
from shared.ml.preprocess.landmarks import MESH_TO_68
from shared.ml.preprocess.pipeline import Preprocessor
from shared.ml.preprocess.pose import MIRROR

ORL = Path(os.environ.get("GESTALT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")) / \
    "faces" / "orl"


def normalised(shape: np.ndarray) -> np.ndarray:
    shape = shape - shape.mean(axis=0)
    return shape / np.linalg.norm(shape[36:42].mean(axis=0) - shape[42:48].mean(axis=0))


def rotation_onto(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The rotation R minimising |a R^T - b| (Kabsch)."""
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(vt.T @ u.T))
    return vt.T @ np.diag([1, 1, d]) @ u.T


def shapes() -> np.ndarray:
    pre = Preprocessor(detector="mediapipe", landmarker="mediapipe")
    out = []
    for path in sorted(ORL.glob("s*/*.pgm")):
        rgb = np.asarray(Image.open(path).convert("RGB"))
        try:
            found = pre.detect(rgb)
        except ImageRejected:
            continue
        frame = Frame.turned(rgb.shape, found.rotation)
        mesh = pre.mesh.mesh(frame.image(rgb), found.face.box)
        if mesh is not None:
            out.append(normalised(mesh[MESH_TO_68]))
    pre.close()
    return np.stack(out)


def mean_face(faces: np.ndarray) -> np.ndarray:
    raw = faces.mean(axis=0)
    ref = raw.copy()
    for _ in range(10):  # generalised Procrustes
        ref = normalised(np.mean([s @ rotation_onto(s, ref).T for s in faces], axis=0))
    ref = ref @ rotation_onto(ref, raw).T  # back onto the photos' average orientation
    mirrored = ref[MIRROR] * (-1, 1, 1)
    sym = (ref + mirrored @ rotation_onto(mirrored, ref).T) / 2
    d = sym - sym[MIRROR]
    normal = np.linalg.svd(d[np.linalg.norm(d, axis=1) > 1e-6], full_matrices=False)[2][0]
    normal = normal * np.sign(normal[0])
    x = np.array([1.0, 0.0, 0.0])
    v, c = np.cross(normal, x), float(normal @ x)
    vx = np.array([[0, -v[2], v[1]], [v[2], 0, -v[0]], [-v[1], v[0], 0]])
    sym = sym @ (np.eye(3) + vx + vx @ vx / (1 + c)).T  # the plane of symmetry onto x = 0
    sym = normalised((sym + sym[MIRROR] * (-1, 1, 1)) / 2)
    return sym - sym[[36, 39, 42, 45]].mean(axis=0)


def main() -> None:
    face = mean_face(shapes())
    for i in range(0, 68, 4):
        print("    " + " ".join(f"[{p[0]:.3f}, {p[1]:.3f}, {p[2]:.3f}]," for p in face[i:i + 4]))


if __name__ == "__main__":
    main()

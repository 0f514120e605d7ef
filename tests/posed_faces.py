"""Photos of known head pose: a real face, texture-mapped onto its own FaceMesh and turned in 3D.

FaceMesh's 468 vertices of a real photo (x, y and depth) make a triangle mesh textured with that
photo. The mesh is first turned to face the camera (the rotation that best maps the mean face
of :mod:`shared.ml.preprocess.pose` onto its 68 points), then turned by the wanted yaw, pitch
and roll and drawn back to front on a grey background (orthographic projection, hidden faces
culled). The pose the drawn face has is then the one asked for, in the mean face's frame.
"""
from __future__ import annotations

import cv2
import numpy as np
from scipy.spatial import ConvexHull, Delaunay

from shared.ml.preprocess.landmarks import MESH_TO_68
from shared.ml.preprocess.pose import MEAN_FACE, rotation

# Scales of the head's rings around the face's outline, and how far back (inter-ocular distances
# per unit of scale) they lie.
HEAD_RINGS = (1.2, 1.45, 1.7)
HEAD_DEPTH = 2.0


def _frontal_rotation(vertices: np.ndarray) -> tuple[np.ndarray, float]:
    """(R, scale) with the photo's 68 points ~ scale * MEAN_FACE @ R.T (+ a shift)."""
    src = vertices[MESH_TO_68] - vertices[MESH_TO_68].mean(axis=0)
    model = MEAN_FACE - MEAN_FACE.mean(axis=0)
    u, _, vt = np.linalg.svd(model.T @ src)
    d = np.sign(np.linalg.det(u @ vt))
    r = (u @ np.diag([1, 1, d]) @ vt).T
    scale = float((src * (model @ r.T)).sum() / (model ** 2).sum())
    return r, scale


class PosedFace:
    """One photo's face, ready to be drawn at any pose."""

    def __init__(self, rgb: np.ndarray, vertices: np.ndarray):
        self.rgb = rgb
        self.source = np.asarray(vertices, np.float64)[:, :2]
        r, scale = _frontal_rotation(vertices)
        centre = vertices[MESH_TO_68].mean(axis=0)
        frontal = (vertices - centre) @ r / scale  # inter-ocular distances, facing the camera
        # The head around the face: rings beyond the mesh's outline, further back the further out,
        # textured with what surrounds the face in the photo (hair, ears, neck).
        outline = ConvexHull(frontal[:, :2]).vertices
        mid, src_mid = frontal[outline, :2].mean(axis=0), self.source[outline].mean(axis=0)
        rings, src_rings = [frontal], [self.source]
        for s in HEAD_RINGS:
            xy = mid + (frontal[outline, :2] - mid) * s
            rings.append(np.column_stack([xy, frontal[outline, 2] + (s - 1) * HEAD_DEPTH]))
            src_rings.append(src_mid + (self.source[outline] - src_mid) * s)
        self.frontal, self.source = np.concatenate(rings), np.concatenate(src_rings)
        self.triangles = Delaunay(self.source).simplices

    def landmarks(self, yaw: float, pitch: float, roll: float, size: int = 440, iod: float = 80.0) -> np.ndarray:
        """The drawn face's exact 68 landmarks (the posed mesh's vertices, projected), in its pixels."""
        posed = self.frontal[MESH_TO_68] @ rotation(yaw, pitch, roll).T
        return posed[:, :2] * iod + size / 2

    def draw(self, yaw: float, pitch: float, roll: float, size: int = 440, iod: float = 80.0) -> np.ndarray:
        posed = self.frontal @ rotation(yaw, pitch, roll).T
        xy = posed[:, :2] * iod + size / 2
        out = np.full((size, size, 3), 128, np.uint8)
        depth = posed[self.triangles, 2].mean(axis=1)
        for tri in self.triangles[np.argsort(-depth)]:  # far ones first
            dst, src = xy[tri].astype(np.float32), self.source[tri].astype(np.float32)
            if _area(dst) * _area(src) <= 0:  # turned away from the camera
                continue
            _paste(out, self.rgb, src, dst)
        return out


def _area(t: np.ndarray) -> float:
    return float((t[1, 0] - t[0, 0]) * (t[2, 1] - t[0, 1]) - (t[2, 0] - t[0, 0]) * (t[1, 1] - t[0, 1]))


def _paste(out: np.ndarray, rgb: np.ndarray, src: np.ndarray, dst: np.ndarray) -> None:
    """The source triangle of ``rgb`` warped onto the destination triangle of ``out``."""
    x0, y0, w, h = cv2.boundingRect(dst)
    sx, sy, sw, sh = cv2.boundingRect(src)
    if w <= 0 or h <= 0 or sw <= 0 or sh <= 0:
        return
    patch = rgb[max(sy, 0):sy + sh, max(sx, 0):sx + sw]
    if patch.size == 0:
        return
    m = cv2.getAffineTransform((src - (max(sx, 0), max(sy, 0))).astype(np.float32), (dst - (x0, y0)).astype(np.float32))
    warped = cv2.warpAffine(patch, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, np.round(dst - (x0, y0)).astype(np.int32), 1, lineType=cv2.LINE_8)
    ox0, oy0 = max(x0, 0), max(y0, 0)
    ox1, oy1 = min(x0 + w, out.shape[1]), min(y0 + h, out.shape[0])
    if ox1 <= ox0 or oy1 <= oy0:
        return
    region = out[oy0:oy1, ox0:ox1]
    sub = mask[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0].astype(bool)
    region[sub] = warped[oy0 - y0:oy1 - y0, ox0 - x0:ox1 - x0][sub]

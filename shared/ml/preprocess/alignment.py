"""Similarity alignment of a face onto one canonical template.

The canonical canvas is ``CANVAS`` x ``CANVAS`` pixels. The five template points
(eye centres, nose tip, mouth corners; "left" is the image's left) put the eyes
on a horizontal line at y = 85 with an inter-ocular distance of 60 px, which
leaves room for the forehead, the chin and both ears. The transform is the
least-squares similarity (rotation, uniform scale, translation; Umeyama) that
maps the five detected points onto the template, with the eyes weighted most.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from skimage.transform import SimilarityTransform

CANVAS = 200
TEMPLATE = np.array([
    [70.0, 85.0],   # left eye centre
    [130.0, 85.0],  # right eye centre
    [100.0, 120.0],  # nose tip
    [76.0, 148.0],  # left mouth corner
    [124.0, 148.0],  # right mouth corner
])


@dataclass(frozen=True)
class Alignment:
    matrix: np.ndarray  # 2 x 3, image pixels -> canvas pixels

    def apply(self, points: np.ndarray) -> np.ndarray:
        pts = np.asarray(points, dtype=np.float64)
        return pts @ self.matrix[:, :2].T + self.matrix[:, 2]

    @property
    def scale(self) -> float:
        return float(np.hypot(*self.matrix[0, :2]))

    @property
    def rotation_degrees(self) -> float:
        return float(np.degrees(np.arctan2(self.matrix[1, 0], self.matrix[0, 0])))


# Each point's weight in the fit, as a whole number of repeats: the eyes count three times
# each, so that they land on the template (within about 1.5 px on the 100 px crop scale)
# while nose and mouth still settle the roll. Proportions below the eyes are kept, not
# squeezed onto the template: a long philtrum stays long.
WEIGHTS = (5, 5, 1, 1, 1)


def estimate_alignment(points: np.ndarray, template: np.ndarray = TEMPLATE,
                       weights: tuple[int, ...] = WEIGHTS) -> Alignment:
    """Weighted least-squares similarity transform from detected points to the template."""
    rows = np.repeat(np.arange(len(template)), weights)
    tform = SimilarityTransform.from_estimate(np.asarray(points, np.float64)[rows], template[rows])
    if not tform:
        raise ValueError("degenerate landmarks: no similarity transform")
    return Alignment(matrix=tform.params[:2].copy())


def warp(image: np.ndarray, alignment: Alignment, size: int = CANVAS) -> np.ndarray:
    """The image in canonical coordinates (border pixels replicate the edge)."""
    return cv2.warpAffine(image, alignment.matrix, (size, size), flags=cv2.INTER_AREA
                          if alignment.scale < 1 else cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)

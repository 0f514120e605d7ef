"""Facial measurements from the 68 landmarks, measured on the aligned face.

Measuring on the aligned canvas makes "horizontal" the line through the eye centres and
removes the photo's scale; every length below is also given relative to the face width, so
the figures compare across photos. Definitions (68-point indices, image-left first):

* ``face_width``: bizygomatic width approximated by the jaw ends, points 0-16.
* ``canthal_index``: inner canthal distance (39-42) / outer canthal distance (36-45) x 100.
  Above about 38 suggests hypertelorism, below about 30 hypotelorism (for orientation; the
  normal range depends on age and ancestry).
* ``palpebral_fissure_length``: mean of the eye-corner distances 36-39 and 42-45, / face width.
* ``palpebral_fissure_slant``: mean angle in degrees of each fissure from inner to outer
  canthus against the eye line; positive is upslanting, negative downslanting.
* ``interpupillary_distance``: distance between the eye centres (mean of each eye's six points,
  the 68-point scheme has no pupil), / face width.
* ``mouth_width``: mouth corners 48-54, / face width.
* ``philtrum_length``: subnasale (33) to the top of the upper lip (51), / face width.
* ``face_height_width``: nasion (27) to menton (8), over face width (the lower two thirds of
  the face: the 68 points do not reach the hairline).
"""
from __future__ import annotations

import numpy as np

MEASUREMENTS = ("canthal_index", "palpebral_fissure_length", "palpebral_fissure_slant", "interpupillary_distance",
                "mouth_width", "philtrum_length", "face_height_width", "face_width")


def _dist(p: np.ndarray, a: int, b: int) -> float:
    return float(np.hypot(*(p[a] - p[b])))


def measure(aligned_landmarks: np.ndarray) -> dict[str, float]:
    """The measurements above from 68 landmarks on the aligned canvas (canvas pixels)."""
    p = np.asarray(aligned_landmarks, np.float64)
    face_width = _dist(p, 0, 16)
    eye_l, eye_r = p[36:42].mean(axis=0), p[42:48].mean(axis=0)

    def slant(inner: int, outer: int) -> float:
        # y grows downwards: the outer canthus above the inner one is a positive (upward) slant.
        return float(np.degrees(np.arctan2(p[inner, 1] - p[outer, 1], abs(p[outer, 0] - p[inner, 0]))))

    values = {
        "canthal_index": 100 * _dist(p, 39, 42) / _dist(p, 36, 45),
        "palpebral_fissure_length": (_dist(p, 36, 39) + _dist(p, 42, 45)) / 2 / face_width,
        "palpebral_fissure_slant": (slant(39, 36) + slant(42, 45)) / 2,
        "interpupillary_distance": float(np.hypot(*(eye_r - eye_l))) / face_width,
        "mouth_width": _dist(p, 48, 54) / face_width,
        "philtrum_length": _dist(p, 33, 51) / face_width,
        "face_height_width": _dist(p, 27, 8) / face_width,
        "face_width": face_width,
    }
    return {k: round(v, 4) for k, v in values.items()}

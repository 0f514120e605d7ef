"""The quality gate: reasons a photo cannot be analysed, in words a clinician can act on.

Each check has a documented threshold, measured on the real photos in the test data
(ORL's 92x112 faces and phone-like colour photos) so that usable photos pass with margin:

* image too small: the shorter side is under ``MIN_IMAGE_SIDE`` pixels.
* face too small: the inter-ocular distance (between the eye centres, in the photo's own
  pixels) is under ``MIN_INTEROCULAR_PX``. At 16 px the face is about 45 px wide and its
  crops are upsampled about 4x; below that they hold too little detail to score.
* strongly non-frontal: the yaw estimated from the landmarks exceeds ``MAX_YAW_DEGREES``.
  Yaw is asin((dl - dr) / (dl + dr)), where dl and dr are the horizontal distances on the
  aligned face from the nose tip (30) to the left (0) and right (16) ends of the jaw line.
* too dark: the mean grey level of the aligned face's central area (x, y 50-150 on the
  200 px canvas) is under ``MIN_BRIGHTNESS`` (0-255).
* too blurry: the variance of the Laplacian of that area is under ``MIN_SHARPNESS``.
  The aligned canvas has a fixed inter-ocular distance of 60 px, so the figure does not
  depend on the photo's resolution.
"""
from __future__ import annotations

import math

import cv2
import numpy as np

MIN_IMAGE_SIDE = 64
MIN_INTEROCULAR_PX = 16.0
MAX_YAW_DEGREES = 45.0
MIN_BRIGHTNESS = 35.0
MIN_SHARPNESS = 8.0

IMAGE_TOO_SMALL = f"the photo is too small (under {MIN_IMAGE_SIDE} pixels on a side); upload the original photo"
# The measured figure is shown to one decimal, rounded away from the limit (down for a distance under
# its minimum, up for an angle over its maximum), so that it never reads as the limit itself.
FACE_TOO_SMALL = ("the face is too small in the photo (eyes {px:.1f} pixels apart, at least "
                  f"{MIN_INTEROCULAR_PX:.0f} needed); upload a closer or higher-resolution photo")
NON_FRONTAL = ("the face is turned too far to the side ({yaw:.1f} degrees, at most "
               f"{MAX_YAW_DEGREES:.0f} accepted); upload a frontal photo")
TOO_DARK = "the face is too dark to analyse; upload a photo taken in better light"
TOO_BLURRY = "the face is too blurry to analyse; upload a sharper photo"

CENTRE = (slice(50, 150), slice(50, 150))


def yaw_degrees(aligned_landmarks: np.ndarray) -> float:
    p = np.asarray(aligned_landmarks, np.float64)
    dl, dr = abs(p[30, 0] - p[0, 0]), abs(p[16, 0] - p[30, 0])
    return float(np.degrees(np.arcsin(np.clip((dl - dr) / max(dl + dr, 1e-6), -1, 1))))


def assess(aligned_gray: np.ndarray, aligned_landmarks: np.ndarray, interocular_px: float) -> dict[str, float]:
    """The figures the gate checks, stored with the face."""
    centre = aligned_gray[CENTRE]
    return {
        "interocular_px": round(float(interocular_px), 2),
        "yaw_degrees": round(yaw_degrees(aligned_landmarks), 2),
        "brightness": round(float(centre.mean()), 2),
        "sharpness": round(float(cv2.Laplacian(centre, cv2.CV_64F).var()), 2),
    }


def rejection(quality: dict[str, float]) -> str | None:
    """The first failed check as a sentence, or None when the face is usable."""
    if quality["interocular_px"] < MIN_INTEROCULAR_PX:
        return FACE_TOO_SMALL.format(px=math.floor(10 * quality["interocular_px"]) / 10)
    if abs(quality["yaw_degrees"]) > MAX_YAW_DEGREES:
        return NON_FRONTAL.format(yaw=math.ceil(10 * abs(quality["yaw_degrees"])) / 10)
    if quality["brightness"] < MIN_BRIGHTNESS:
        return TOO_DARK
    if quality["sharpness"] < MIN_SHARPNESS:
        return TOO_BLURRY
    return None


def reason_kind(reason: str) -> str:
    """A rejection reason without its figures and advice, for counting (``the face is too small in the photo``)."""
    return reason.split(" (", 1)[0].split(";", 1)[0].strip()

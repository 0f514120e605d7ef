"""The quality gate: reasons a photo cannot be analysed, in words a clinician can act on, and
the flags of a photo that is analysed but less reliable.

Each check has a documented threshold, set from what the steps after it need (not fitted to a
collection of photos):

* image too small: the shorter side is under ``MIN_IMAGE_SIDE`` pixels.
* face too small: the inter-ocular distance (between the eye centres, in the photo's own
  pixels) is under ``MIN_INTEROCULAR_PX``. At 16 px the face is about 45 px wide and its
  crops are upsampled about 4x; below that they hold too little detail to score.
* turned too far: the head's yaw or pitch (:mod:`shared.ml.preprocess.pose`, a 3D mean face fitted
  to the landmarks) is over ``MAX_TURN_DEGREES``. Beyond that the far half of the face is hidden
  and the alignment has nothing to put there.
* too dark: the mean grey level of the aligned face's central area (x, y 50-150 on the
  200 px canvas) is under ``MIN_BRIGHTNESS`` (0-255).
* too blurry: the variance of the Laplacian of that area is under ``MIN_SHARPNESS``.
  The aligned canvas has a fixed inter-ocular distance of 60 px, so the figure does not
  depend on the photo's resolution.

A face turned by more than ``FRONTAL_DEGREES`` (yaw or pitch) but not refused is scored and
flagged ``turned`` ("turned face: less reliable"): the models learn from frontal photos, and past
about 30 degrees the far eye's outer corner and cheek start to hide behind the face. The flags are
stored with the quality figures (``quality["flags"]``).
"""
from __future__ import annotations

import math

import cv2
import numpy as np

from shared.ml.preprocess.pose import HeadPose, head_pose

MIN_IMAGE_SIDE = 64
MIN_INTEROCULAR_PX = 16.0
MAX_TURN_DEGREES = 60.0
FRONTAL_DEGREES = 30.0
MIN_BRIGHTNESS = 35.0
MIN_SHARPNESS = 8.0

IMAGE_TOO_SMALL = f"the photo is too small (under {MIN_IMAGE_SIDE} pixels on a side); upload the original photo"
# The measured figure is shown to one decimal, rounded away from the limit (down for a distance under
# its minimum, up for an angle over its maximum), so that it never reads as the limit itself.
FACE_TOO_SMALL = ("the face is too small in the photo (eyes {px:.1f} pixels apart, at least "
                  f"{MIN_INTEROCULAR_PX:.0f} needed); upload a closer or higher-resolution photo")
NON_FRONTAL = ("the face is turned too far to the side ({yaw:.1f} degrees, at most "
               f"{MAX_TURN_DEGREES:.0f} accepted); upload a photo of the face turned towards the camera")
TILTED = ("the face is tilted too far up or down ({pitch:.1f} degrees, at most "
          f"{MAX_TURN_DEGREES:.0f} accepted); upload a photo taken at the height of the face")
# Flags of a scored face, and how the portal, the report and the API word them.
TURNED = "turned"
FLAG_TEXT = {TURNED: "turned face: less reliable"}
TOO_DARK = "the face is too dark to analyse; upload a photo taken in better light"
TOO_BLURRY = "the face is too blurry to analyse; upload a sharper photo"

CENTRE = (slice(50, 150), slice(50, 150))


def assess(aligned_gray: np.ndarray, pose: HeadPose, interocular_px: float) -> dict:
    """The figures the gate checks, and the face's flags, stored with the face."""
    centre = aligned_gray[CENTRE]
    quality = {
        "interocular_px": round(float(interocular_px), 2),
        "yaw_degrees": round(pose.yaw, 2),
        "pitch_degrees": round(pose.pitch, 2),
        "roll_degrees": round(pose.roll, 2),
        "pose_fit": round(pose.fit_error, 3),
        "brightness": round(float(centre.mean()), 2),
        "sharpness": round(float(cv2.Laplacian(centre, cv2.CV_64F).var()), 2),
    }
    quality["flags"] = [TURNED] if turned(pose.yaw, pose.pitch) else []
    return quality


def turned(yaw: float, pitch: float) -> bool:
    """Whether a face at this pose is flagged as turned (scored, but less reliable)."""
    return max(abs(yaw), abs(pitch)) > FRONTAL_DEGREES


def turned_faces(canvas_landmarks: np.ndarray) -> np.ndarray:
    """For each face's 68 landmarks (N x 68 x 2, e.g. on the aligned canvas), whether it is flagged turned.

    Yaw and pitch do not depend on where the landmarks lie in the image (see :mod:`~shared.ml.preprocess.pose`),
    so the landmarks on the aligned canvas give the same flags as the photo's.
    """
    out = []
    for landmarks in np.asarray(canvas_landmarks, np.float64):
        pose = head_pose(landmarks)
        out.append(pose is not None and turned(pose.yaw, pose.pitch))
    return np.asarray(out, bool)


def rejection(quality: dict) -> str | None:
    """The first failed check as a sentence, or None when the face is usable."""
    if quality["interocular_px"] < MIN_INTEROCULAR_PX:
        return FACE_TOO_SMALL.format(px=math.floor(10 * quality["interocular_px"]) / 10)
    if abs(quality["yaw_degrees"]) > MAX_TURN_DEGREES:
        return NON_FRONTAL.format(yaw=math.ceil(10 * abs(quality["yaw_degrees"])) / 10)
    if abs(quality.get("pitch_degrees", 0.0)) > MAX_TURN_DEGREES:
        return TILTED.format(pitch=math.ceil(10 * abs(quality["pitch_degrees"])) / 10)
    if quality["brightness"] < MIN_BRIGHTNESS:
        return TOO_DARK
    if quality["sharpness"] < MIN_SHARPNESS:
        return TOO_BLURRY
    return None


def reason_kind(reason: str) -> str:
    """A rejection reason without its figures and advice, for counting (``the face is too small in the photo``)."""
    return reason.split(" (", 1)[0].split(";", 1)[0].strip()

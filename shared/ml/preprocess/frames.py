"""The frames a photo is shown to the detector in: turned, and for faces that fill the photo, padded.

A :class:`Frame` is the photo turned by ``angle`` degrees (counter-clockwise as displayed) on a
canvas that holds it all, optionally scaled and with a blank margin of ``pad`` pixels on every
side. Points move between the photo's pixels and the frame's with :meth:`Frame.to_frame` and
:meth:`Frame.to_photo`. The stored face box is always in the unpadded, unscaled frame of its angle
(:meth:`Frame.plain`), so that the alignment step can rebuild that frame from the angle alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from shared.ml.preprocess.detection import DetectedFace

# The margin added around a photo whose face was not found, as a fraction of its longer side:
# a face that fills the frame (a close-up) then has the room around it that detectors expect.
PAD_FRACTION = 0.25
# Photos whose longer side is under this many pixels are also doubled in that padded frame,
# so that their face meets the detectors' smallest anchors.
SMALL_SIDE = 400


@dataclass(frozen=True)
class Frame:
    """The photo turned by ``angle`` degrees, scaled by ``scale``, with ``pad`` blank pixels on each side."""

    angle: float
    matrix: np.ndarray  # 2 x 3, photo pixels -> frame pixels
    size: tuple[int, int]  # width, height of the frame
    shape: tuple[int, int]  # the photo's height, width
    pad: int = 0
    scale: float = 1.0

    @classmethod
    def turned(cls, shape: tuple[int, ...], angle: float, pad: int = 0, scale: float = 1.0) -> Frame:
        h, w = shape[:2]
        m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, scale)
        cos, sin = abs(m[0, 0]), abs(m[0, 1])
        fw, fh = int(round(h * sin + w * cos)) + 2 * pad, int(round(h * cos + w * sin)) + 2 * pad
        m[0, 2] += fw / 2 - w / 2
        m[1, 2] += fh / 2 - h / 2
        return cls(float(angle), m, (fw, fh), (h, w), int(pad), float(scale))

    @classmethod
    def padded(cls, shape: tuple[int, ...], angle: float) -> Frame:
        """The frame of ``angle`` with a margin of ``PAD_FRACTION`` (small photos doubled first)."""
        h, w = shape[:2]
        scale = 2.0 if max(h, w) < SMALL_SIDE else 1.0
        return cls.turned(shape, angle, int(round(PAD_FRACTION * max(h, w) * scale)), scale)

    def again(self, angle: float) -> Frame:
        """A frame of another angle, padded and scaled as this one."""
        return Frame.turned(self.shape, angle, self.pad, self.scale)

    def plain(self) -> Frame:
        """This frame's angle without padding or scaling: the frame stored boxes are in."""
        return self if self.pad == 0 and self.scale == 1.0 else Frame.turned(self.shape, self.angle)

    def image(self, rgb: np.ndarray) -> np.ndarray:
        if self.angle == 0 and self.pad == 0 and self.scale == 1.0:
            return rgb
        return cv2.warpAffine(rgb, self.matrix, self.size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, np.float64) @ self.matrix[:, :2].T + self.matrix[:, 2]

    def to_photo(self, points: np.ndarray) -> np.ndarray:
        inverse = cv2.invertAffineTransform(self.matrix)
        return np.asarray(points, np.float64) @ inverse[:, :2].T + inverse[:, 2]

    def face_in(self, other: Frame, face: DetectedFace) -> DetectedFace:
        """``face`` (found in this frame) in ``other``, a frame of the same angle."""
        (x0, y0), (x1, y1) = other.to_frame(self.to_photo(np.array([face.box[:2], face.box[2:]])))
        points = None if face.points is None else tuple(map(tuple, other.to_frame(self.to_photo(face.points))))
        return DetectedFace((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)), face.score, points)

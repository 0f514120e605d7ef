"""Photo -> main face -> landmarks -> aligned canvas -> region crops.

The worker runs the two halves as separate queue stages (``detect`` and ``align``);
training and the CLI call :meth:`Preprocessor.run` for both at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from shared.ml.alignment import CANVAS, Alignment, estimate_alignment, warp
from shared.ml.detection import DetectedFace, MediaPipeDetector, choose_main_face
from shared.ml.imaging import ImageRejected
from shared.ml.landmarks import MediaPipeMesh, five_points
from shared.ml.regions import DEFAULT_REGIONS, crop_regions

NO_FACE = "no face was found in the photo; upload a frontal photo of the face"
NO_LANDMARKS = "the face could not be measured (landmarks not found); upload a sharper, frontal photo"


@dataclass
class AlignedFace:
    landmarks: np.ndarray  # 468 x 2, image pixels
    alignment: Alignment
    aligned_rgb: np.ndarray  # CANVAS x CANVAS x 3
    crops: dict[str, np.ndarray]  # region -> 100 x 100 uint8


@dataclass
class Preprocessed:
    face: DetectedFace
    faces_found: int
    aligned: AlignedFace


class Preprocessor:
    """Holds the detector and landmark models of one process."""

    def __init__(self, min_confidence: float = 0.5, regions: tuple[str, ...] = DEFAULT_REGIONS):
        self.min_confidence = min_confidence
        self.regions = regions
        self.detector = MediaPipeDetector(min_confidence)
        self.mesh = MediaPipeMesh()

    @property
    def detector_name(self) -> str:
        return self.detector.name

    @property
    def landmarker_name(self) -> str:
        return self.mesh.name

    def detect(self, rgb: np.ndarray) -> tuple[DetectedFace, int]:
        """The main face and how many confident faces were found.

        Raises:
            ImageRejected: when there is no confident face.
        """
        faces = self.detector.detect(rgb)
        main = choose_main_face(faces, self.min_confidence)
        if main is None:
            raise ImageRejected(NO_FACE)
        return main, sum(f.score >= self.min_confidence for f in faces)

    def align(self, rgb: np.ndarray, box: tuple[float, float, float, float]) -> AlignedFace:
        """Landmarks, alignment to the template and the region crops of the face in ``box``."""
        landmarks = self.mesh.landmarks(rgb, box)
        if landmarks is None:
            raise ImageRejected(NO_LANDMARKS)
        alignment = estimate_alignment(five_points(landmarks))
        aligned_rgb = warp(rgb, alignment, CANVAS)
        gray = cv2.cvtColor(aligned_rgb, cv2.COLOR_RGB2GRAY)
        return AlignedFace(landmarks=landmarks, alignment=alignment, aligned_rgb=aligned_rgb,
                           crops=crop_regions(gray, self.regions))

    def run(self, rgb: np.ndarray) -> Preprocessed:
        face, found = self.detect(rgb)
        return Preprocessed(face=face, faces_found=found, aligned=self.align(rgb, face.box))

    def close(self) -> None:
        self.detector.close()
        self.mesh.close()

"""Photo -> main face -> landmarks -> quality gate -> aligned canvas -> region crops and measurements.

The worker runs the two halves as separate queue stages (``detect`` and ``align``);
training, the CLI and benchmarks call :meth:`Preprocessor.run` / :meth:`Preprocessor.run_batch`.

Finding the face: detection runs on the photo as it is, once for a whole batch. For a photo with
no face it then tries, each as one batch over the photos still without a face, the photo on a
padded canvas (a face that fills the frame), then turned by 90, -90 and 180 degrees, then turned
and padded (:data:`FALLBACKS`). A face found only that way must also be confirmed by the landmark
model, as turned and padded photos raise the detectors' false alarms. So an ordinary photo costs
one detector pass, as before.

Levelling: once a face is found, the photo is turned so that the detector's two eye points are
level and the face is detected again (up to ``LEVEL_PASSES`` times), so the landmark model
always sees an upright face. The face's box is kept in that turned frame together with its angle;
landmarks are mapped back to the photo's own pixels, and the alignment warps the photo itself, so
a photo turned by 90 degrees yields the same crops as the upright one.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np

from shared.ml.preprocess import backends
from shared.ml.preprocess.alignment import CANVAS, Alignment, estimate_alignment, warp
from shared.ml.preprocess.detection import DetectedFace, choose_main_face
from shared.ml.preprocess.facechip import face_chip
from shared.ml.preprocess.frames import Frame
from shared.ml.preprocess.imaging import ImageRejected
from shared.ml.preprocess.landmarks import five_points
from shared.ml.preprocess.measurements import measure
from shared.ml.preprocess.pose import head_pose
from shared.ml.preprocess.quality import IMAGE_TOO_SMALL, MIN_IMAGE_SIDE, assess, rejection
from shared.ml.preprocess.regions import DEFAULT_REGIONS, crop_regions, cut_regions

logger = logging.getLogger(__name__)

NO_FACE = "no face was found in the photo; upload a frontal photo of the face"
NO_LANDMARKS = "the face could not be measured (landmarks not found); upload a sharper, frontal photo"

# Eyes tilted by more than this many degrees are levelled before landmarks run.
LEVEL_TOLERANCE = 12.0
LEVEL_PASSES = 2
# Turns of the detector's frame in which the landmark model looks for a face it did not find there.
LANDMARK_TURNS = (180.0, 90.0, -90.0)
# (angle, padded) tried, in this order, when the photo as it is shows no face.
FALLBACKS = ((0.0, True), (90.0, False), (-90.0, False), (180.0, False), (90.0, True), (-90.0, True),
             (180.0, True))


@dataclass
class Detection:
    face: DetectedFace  # box and points in the turned frame
    faces_found: int
    rotation: float  # degrees; the frame in which ``face`` was found


@dataclass
class AlignedFace:
    landmarks: np.ndarray  # 68 x 2, photo pixels
    alignment: Alignment
    aligned_rgb: np.ndarray  # CANVAS x CANVAS x 3
    crops: dict[str, np.ndarray]  # region -> 100 x 100 uint8
    quality: dict  # the gate's figures (floats) and "flags" (shared.ml.preprocess.quality)
    measurements: dict[str, float]
    # dlib's 150 x 150 RGB face chip from the photo itself (shared.ml.preprocess.facechip), the identity
    # encoder's input.
    chip: np.ndarray | None = None
    # region -> 150 x 150 x 3 uint8: each of the paper's four regions cut from the photo at the encoder's size
    # (regions.cut_regions), what the encoder's regional members read.
    cuts: dict[str, np.ndarray] | None = None


@dataclass
class Preprocessed:
    detection: Detection
    aligned: AlignedFace

    @property
    def face(self) -> DetectedFace:
        return self.detection.face

    @property
    def faces_found(self) -> int:
        return self.detection.faces_found


def resolve_backends(detector: str = "auto", landmarker: str = "auto") -> tuple[str, str]:
    """``auto`` becomes the production backend when its weights are present, else the offline one
    (see :mod:`shared.ml.preprocess.backends`)."""
    return backends.resolve(detector, landmarker)


def check_backends(settings) -> str:
    """The backends a worker will use, after checking that their weights are present (and verified).

    Raises:
        WeightsMissing: with one line naming the missing file and where to put it.
        ValueError: for an unknown backend name.
    """
    detector, landmarker = resolve_backends(settings.detector_backend, settings.landmark_backend)
    detector = backends.DETECTORS[detector].check(detector, settings.weights_verify)
    landmarker = backends.LANDMARKERS[landmarker].check(landmarker, settings.weights_verify)
    return f"detector={detector} landmarks={landmarker}"


class Preprocessor:
    """Holds the detector and landmark models of one process."""

    def __init__(self, min_confidence: float = 0.5, regions: tuple[str, ...] = DEFAULT_REGIONS,
                 detector: str = "mediapipe", landmarker: str = "mediapipe", device: str = "cpu",
                 verify_weights: bool = True):
        detector, landmarker = resolve_backends(detector, landmarker)
        self.min_confidence = min_confidence
        self.regions = tuple(regions)
        self.detector: backends.Detector = backends.DETECTORS[detector].create(min_confidence, device, verify_weights)
        self.mesh: backends.Landmarker = backends.LANDMARKERS[landmarker].create(min_confidence, device,
                                                                                 verify_weights)

    @classmethod
    def from_settings(cls, settings, regions: tuple[str, ...] = DEFAULT_REGIONS) -> Preprocessor:
        from shared.ml.runtime.device import resolve_device

        return cls(settings.min_face_confidence, regions, settings.detector_backend, settings.landmark_backend,
                   str(resolve_device(settings.device)), settings.weights_verify)

    @property
    def detector_name(self) -> str:
        return self.detector.name

    @property
    def landmarker_name(self) -> str:
        return self.mesh.name

    @property
    def provenance(self) -> dict[str, str]:
        """The backends and the sha256 of the weights that produced a face."""
        return {"detector": self.detector.name, "detector_sha256": self.detector.weights_sha256,
                "landmarker": self.mesh.name, "landmarker_sha256": self.mesh.weights_sha256}

    # --- detection -------------------------------------------------------------------------

    def _confident(self, faces: list[DetectedFace]) -> int:
        return sum(f.score >= self.min_confidence for f in faces)

    def _levelled(self, rgb: np.ndarray, frame: Frame, faces: list[DetectedFace],
                  main: DetectedFace) -> tuple[Frame, list[DetectedFace], DetectedFace]:
        """Turn the photo until the main face's eyes are level (see the module doc)."""
        for _ in range(LEVEL_PASSES):
            tilt = main.eye_angle
            if tilt is None or abs(tilt) <= LEVEL_TOLERANCE:
                break
            x0, y0, x1, y1 = main.box
            centre = frame.to_photo(np.array([[(x0 + x1) / 2, (y0 + y1) / 2]]))
            turned = frame.again(frame.angle + tilt)
            again = [f for f in self.detector.detect(turned.image(rgb)) if f.score >= self.min_confidence]
            if not again:
                break
            cx, cy = turned.to_frame(centre)[0]

            def distance(f: DetectedFace, cx: float = cx, cy: float = cy) -> float:
                return float(np.hypot((f.box[0] + f.box[2]) / 2 - cx, (f.box[1] + f.box[3]) / 2 - cy))

            nearest = min(again, key=distance)
            if distance(nearest) > max(x1 - x0, y1 - y0):
                break  # not the same face
            frame, faces, main = turned, again, nearest
        return frame, faces, main

    def _found(self, rgb: np.ndarray, frame: Frame, faces: list[DetectedFace], confirm: bool) -> Detection | None:
        """The main face among ``faces`` (found in ``frame``), levelled; with ``confirm``, only if the landmark
        model finds it too."""
        main = choose_main_face(faces, self.min_confidence, frame.size[::-1])
        if main is None:
            return None
        frame, faces, main = self._levelled(rgb, frame, faces, main)
        if confirm and self.mesh.landmarks(frame.image(rgb), main.box) is None:
            return None
        return Detection(frame.face_in(frame.plain(), main), self._confident(faces), frame.angle)

    def detect(self, rgb: np.ndarray) -> Detection:
        """The main face, how many confident faces were found, and the frame it was found in.

        Raises:
            ImageRejected: when the photo is too small or has no confident face.
        """
        result = self.detect_batch([rgb])[0]
        if isinstance(result, ImageRejected):
            raise result
        return result

    def detect_batch(self, images: list[np.ndarray]) -> list[Detection | ImageRejected]:
        """:meth:`detect` for many photos: the first pass, and each fallback, run as one batch on batched
        backends."""
        out: list[Detection | ImageRejected | None] = [None] * len(images)
        pending = []
        for i, (rgb, faces) in enumerate(zip(images, self.detector.detect_batch(images), strict=True)):
            if min(rgb.shape[:2]) < MIN_IMAGE_SIDE:
                out[i] = ImageRejected(IMAGE_TOO_SMALL)
            elif (found := self._found(rgb, Frame.turned(rgb.shape, 0.0), faces, confirm=False)) is not None:
                out[i] = found
            else:
                pending.append(i)
        for angle, padded in FALLBACKS:
            if not pending:
                break
            frames = {i: Frame.padded(images[i].shape, angle) if padded else Frame.turned(images[i].shape, angle)
                      for i in pending}
            results = self.detector.detect_batch([frames[i].image(images[i]) for i in pending])
            still = []
            for i, faces in zip(pending, results, strict=True):
                out[i] = self._found(images[i], frames[i], faces, confirm=True)
                if out[i] is None:
                    still.append(i)
            pending = still
        for i in pending:
            out[i] = ImageRejected(NO_FACE)
        return out

    # --- landmarks, gate, alignment ---------------------------------------------------------

    def _finish(self, rgb: np.ndarray, landmarks: np.ndarray | None) -> AlignedFace:
        if landmarks is None:
            raise ImageRejected(NO_LANDMARKS)
        points = five_points(landmarks)
        try:
            alignment = estimate_alignment(points)
        except ValueError as exc:
            raise ImageRejected(NO_LANDMARKS) from exc
        pose = head_pose(landmarks)
        if pose is None:  # no head position fits the landmarks
            raise ImageRejected(NO_LANDMARKS)
        aligned_rgb = warp(rgb, alignment, CANVAS)
        gray = cv2.cvtColor(aligned_rgb, cv2.COLOR_RGB2GRAY)
        on_canvas = alignment.apply(landmarks)
        quality = assess(gray, pose, float(np.hypot(*(points[1] - points[0]))))
        reason = rejection(quality)
        if reason:
            raise ImageRejected(reason)
        return AlignedFace(landmarks=landmarks, alignment=alignment, aligned_rgb=aligned_rgb,
                           crops=crop_regions(gray, self.regions), quality=quality, measurements=measure(on_canvas),
                           chip=face_chip(rgb, landmarks), cuts=cut_regions(rgb, alignment.matrix, DEFAULT_REGIONS))

    def align(self, rgb: np.ndarray, box: tuple[float, float, float, float], rotation: float = 0.0) -> AlignedFace:
        """Landmarks, the quality gate, alignment, crops and measurements of the face in ``box``.

        Args:
            box: the face's box in the frame turned by ``rotation`` degrees (see :class:`Frame`).

        Raises:
            ImageRejected: when landmarks are not found or the face fails the quality gate.
        """
        result = self.align_batch([rgb], [box], [rotation])[0]
        if isinstance(result, ImageRejected):
            raise result
        return result

    def align_batch(self, images: list[np.ndarray], boxes: list[tuple],
                    rotations: list[float]) -> list[AlignedFace | ImageRejected]:
        """:meth:`align` for many photos; landmarks run as one batch on batched backends."""
        frames = [Frame.turned(rgb.shape, r) for rgb, r in zip(images, rotations, strict=True)]
        found = self.mesh.landmarks_batch([f.image(rgb) for f, rgb in zip(frames, images, strict=True)],
                                          [tuple(b) for b in boxes])
        found = [None if lm is None else f.to_photo(lm) for f, lm in zip(frames, found, strict=True)]
        found = self._landmarks_turned(images, frames, boxes, found)
        out: list[AlignedFace | ImageRejected] = []
        for rgb, lm in zip(images, found, strict=True):
            try:
                out.append(self._finish(rgb, lm))
            except ImageRejected as exc:
                out.append(exc)
        return out

    def _landmarks_turned(self, images: list[np.ndarray], frames: list[Frame], boxes: list[tuple],
                          found: list[np.ndarray | None]) -> list[np.ndarray | None]:
        """Landmarks (photo pixels) the model did not find in the detector's frame, looked for in that frame
        turned by 180, 90 and -90 degrees, one batch per turn: the detectors find an upside-down or sideways
        face without telling which way up it is."""
        for turn in LANDMARK_TURNS:
            missing = [i for i, lm in enumerate(found) if lm is None]
            if not missing:
                break
            turned = {i: frames[i].again(frames[i].angle + turn) for i in missing}
            got = self.mesh.landmarks_batch(
                [turned[i].image(images[i]) for i in missing],
                [frames[i].face_in(turned[i], DetectedFace(tuple(boxes[i]), 1.0)).box for i in missing])
            for i, lm in zip(missing, got, strict=True):
                found[i] = None if lm is None else turned[i].to_photo(lm)
        return found

    def run(self, rgb: np.ndarray) -> Preprocessed:
        detection = self.detect(rgb)
        return Preprocessed(detection, self.align(rgb, detection.face.box, detection.rotation))

    def run_batch(self, images: list[np.ndarray]) -> list[Preprocessed | ImageRejected]:
        """Detection and landmarks each run once over the whole list on batched backends."""
        detections = self.detect_batch(images)
        ok = [i for i, d in enumerate(detections) if isinstance(d, Detection)]
        aligned = self.align_batch([images[i] for i in ok], [detections[i].face.box for i in ok],
                                   [detections[i].rotation for i in ok])
        out: list[Preprocessed | ImageRejected] = list(detections)
        for i, a in zip(ok, aligned, strict=True):
            out[i] = a if isinstance(a, ImageRejected) else Preprocessed(detections[i], a)
        return out

    def close(self) -> None:
        self.detector.close()
        self.mesh.close()

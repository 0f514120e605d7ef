"""Face detection. Detectors return boxes, scores and five key points; cropping lives elsewhere.

Backends (registered in :mod:`shared.ml.preprocess.backends`):

* ``retinaface``: RetinaFace. ResNet-50 (retinaface-pytorch's network and weights) when its
  weights are present, else MobileNet-0.25 (face-alignment's network and weights). Batched:
  a list of photos is letterboxed into one tensor.
* ``mediapipe``: BlazeFace full range from the mediapipe 0.10.21 wheel; needs no downloads.

Every face carries five points in the order eye, eye, nose tip, mouth corner, mouth corner,
with the subject's right eye first (on the image's left when the photo is upright). The
preprocessor uses them to level the eyes before landmarks run.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from shared.ml.formats.weights import WEIGHTS_BY_KEY, locate, mediapipe_model_sha, require, sha256_of

logger = logging.getLogger(__name__)

# The main face is the largest confident one. Faces within this fraction of the largest
# area count as equally large, and the one nearest the photo's centre wins among them.
SIZE_TIE = 0.03
# RetinaFace: photos are resized so the longer side is this many pixels before detection.
RETINAFACE_MAX_SIDE = 640
NMS_IOU = 0.4


@dataclass(frozen=True)
class DetectedFace:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 in image pixels
    score: float
    points: tuple[tuple[float, float], ...] | None = None  # five key points (see module doc)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)

    @property
    def eye_angle(self) -> float | None:
        """Angle in degrees of the line from the first eye to the second (0 when the eyes are level)."""
        if not self.points:
            return None
        (ax, ay), (bx, by) = self.points[0], self.points[1]
        return float(np.degrees(np.arctan2(by - ay, bx - ax)))


def choose_main_face(faces: list[DetectedFace], min_confidence: float,
                     shape: tuple[int, int] | None = None) -> DetectedFace | None:
    """The largest confident face, the most central one among near-equals (``SIZE_TIE``), or None.

    Args:
        shape: the photo's (height, width); without it the largest face wins outright.
    """
    confident = [f for f in faces if f.score >= min_confidence]
    if not confident:
        return None
    largest = max(f.area for f in confident)
    if shape is None:
        return max(confident, key=lambda f: f.area)
    h, w = shape[:2]

    def off_centre(f: DetectedFace) -> float:
        x0, y0, x1, y1 = f.box
        return float(np.hypot((x0 + x1) / 2 - w / 2, (y0 + y1) / 2 - h / 2))

    return min((f for f in confident if f.area >= (1 - SIZE_TIE) * largest), key=off_centre)


class MediaPipeDetector:
    """BlazeFace full range from the mediapipe wheel. One instance per process (not fork-safe)."""

    name = "mediapipe-blazeface-full"

    def __init__(self, min_confidence: float = 0.5):
        import mediapipe as mp

        self.min_confidence = min_confidence
        self._detector = mp.solutions.face_detection.FaceDetection(
            model_selection=1, min_detection_confidence=min_confidence)
        self.weights_sha256 = mediapipe_model_sha("face_detection_full_range")

    def _run(self, rgb: np.ndarray) -> list[DetectedFace]:
        h, w = rgb.shape[:2]
        result = self._detector.process(np.ascontiguousarray(rgb))
        faces = []
        for det in result.detections or []:
            rel = det.location_data.relative_bounding_box
            x0, y0 = rel.xmin * w, rel.ymin * h
            kps = det.location_data.relative_keypoints  # right eye, left eye, nose tip, mouth centre, ears
            eyes_nose = [(k.x * w, k.y * h) for k in kps[:3]]
            mouth = (kps[3].x * w, kps[3].y * h)
            # BlazeFace has no mouth corners: both take the mouth centre (only the eyes are used).
            points = (*eyes_nose, mouth, mouth)
            faces.append(DetectedFace((x0, y0, x0 + rel.width * w, y0 + rel.height * h), float(det.score[0]),
                                      points))
        return faces

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        """All confident faces, in image pixels (faces that fill the photo: see ``frames.Frame.padded``).

        Args:
            rgb: H x W x 3 uint8 image.
        """
        return self._run(rgb)

    def detect_batch(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        """BlazeFace's graph takes one photo at a time."""
        return [self.detect(rgb) for rgb in images]

    def close(self) -> None:
        self._detector.close()


class RetinaFaceDetector:
    """RetinaFace on batches of photos, on CPU or GPU.

    ``variant`` is ``resnet50`` (retinaface-pytorch's network; RGB input normalised with
    ImageNet statistics) or ``mobilenet0.25`` (face-alignment's network; BGR input minus
    the channel means it was trained with).
    """

    def __init__(self, variant: str = "resnet50", min_confidence: float = 0.5, device: str = "cpu",
                 path: str | None = None, max_side: int = RETINAFACE_MAX_SIDE, verify: bool = True):
        import torch

        self.variant = variant
        self.min_confidence = min_confidence
        self.device = device
        self.max_side = max_side
        if variant == "resnet50":
            from retinaface.network import RetinaFace

            weight = WEIGHTS_BY_KEY[RETINAFACE_WEIGHTS[variant]]
            net = RetinaFace(name="Resnet50", pretrained=False, return_layers={"layer2": 1, "layer3": 2, "layer4": 3},
                             in_channels=256, out_channels=256)
            file = path or require(weight, verify)
            if path is None:
                from torch.utils import model_zoo

                # retinaface-pytorch's own loader; the file is already in ``model_dir``, so it never downloads.
                state = model_zoo.load_url(weight.url, model_dir=str(Path(file).parent), map_location="cpu",
                                           file_name=Path(file).name)
            else:
                state = torch.load(file, map_location="cpu", weights_only=True)
            self.softmax_in_net = False
        elif variant == "mobilenet0.25":
            from face_alignment.detection.retinaface.net_retinaface import RetinaFace, cfg_mnet

            weight = WEIGHTS_BY_KEY[RETINAFACE_WEIGHTS[variant]]
            net = RetinaFace(cfg=cfg_mnet)
            file = path or require(weight, verify)
            state = torch.load(file, map_location="cpu", weights_only=True)
            self.softmax_in_net = True
        else:
            raise ValueError(f"unknown RetinaFace variant {variant!r}; use resnet50 or mobilenet0.25")
        state = {k.removeprefix("module."): v for k, v in state.items()}
        net.load_state_dict(state)
        self.weights_sha256 = sha256_of(Path(file))
        self.net = net.to(device).eval()
        self.name = f"retinaface-{variant}"
        self.half = device.startswith("cuda")
        if self.half:
            self.net = self.net.half()

    def _tensor(self, resized: list[np.ndarray], height: int, width: int):
        """The letterboxed batch, normalised on the device: only uint8 pixels cross to a GPU (a quarter
        of float32's bytes), and the host does no per-pixel arithmetic. Padding stays 0 after
        normalisation, as the networks were run before."""
        import torch

        batch = np.zeros((len(resized), height, width, 3), np.uint8)
        for i, img in enumerate(resized):
            batch[i, :img.shape[0], :img.shape[1]] = img
        x = torch.from_numpy(batch).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = x.to(torch.float16 if self.half else torch.float32)
        if self.variant == "resnet50":
            mean = torch.tensor((0.485, 0.456, 0.406), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            std = torch.tensor((0.229, 0.224, 0.225), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
            x = (x / 255.0 - mean) / std
        else:  # BGR minus the channel means
            x = x.flip(1) - torch.tensor((104.0, 117.0, 123.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        for i, img in enumerate(resized):
            x[i, :, img.shape[0]:, :] = 0
            x[i, :, :, img.shape[1]:] = 0
        return x.contiguous()

    def detect_batch(self, images: list[np.ndarray]) -> list[list[DetectedFace]]:
        """All confident faces of each photo, in that photo's pixels."""
        import torch
        from retinaface.box_utils import decode, decode_landm
        from retinaface.prior_box import priorbox
        from torchvision.ops import nms

        if not images:
            return []
        scales, resized = [], []
        for rgb in images:
            h, w = rgb.shape[:2]
            s = min(1.0, self.max_side / max(h, w))
            scales.append(s)
            resized.append(cv2.resize(rgb, (max(1, round(w * s)), max(1, round(h * s))),
                                      interpolation=cv2.INTER_AREA) if s < 1 else rgb)
        # A common size, a multiple of the largest stride, so that every photo shares the priors.
        height = int(np.ceil(max(r.shape[0] for r in resized) / 32) * 32)
        width = int(np.ceil(max(r.shape[1] for r in resized) / 32) * 32)
        with torch.inference_mode():
            loc, conf, land = self.net(self._tensor(resized, height, width))
        loc, conf, land = loc.float(), conf.float(), land.float()
        if not self.softmax_in_net:
            conf = torch.softmax(conf, dim=-1)
        priors = priorbox(min_sizes=[[16, 32], [64, 128], [256, 512]], steps=[8, 16, 32], clip=False,
                          image_size=(height, width)).to(loc.device)
        size = torch.tensor([width, height], dtype=torch.float32, device=loc.device)
        out = []
        for i, s in enumerate(scales):
            scores = conf[i, :, 1]
            keep = scores > self.min_confidence
            if not keep.any():
                out.append([])
                continue
            boxes = decode(loc[i][keep], priors[keep], [0.1, 0.2]) * size.repeat(2)
            points = decode_landm(land[i][keep], priors[keep], [0.1, 0.2]) * size.repeat(5)
            kept = nms(boxes, scores[keep], NMS_IOU)
            faces = []
            for j in kept.tolist():
                b = (boxes[j] / s).tolist()
                p = (points[j] / s).view(5, 2).tolist()
                faces.append(DetectedFace(tuple(b), float(scores[keep][j]), tuple(map(tuple, p))))
            out.append(faces)
        return out

    def detect(self, rgb: np.ndarray) -> list[DetectedFace]:
        return self.detect_batch([rgb])[0]

    def close(self) -> None:
        self.net = None


# Each RetinaFace variant's weight file (``shared.ml.formats.weights``).
RETINAFACE_WEIGHTS = {"resnet50": "retinaface_resnet50", "mobilenet0.25": "retinaface_mobilenet"}


def retinaface_variant() -> str:
    """The best RetinaFace whose weights are present: ``resnet50``, else ``mobilenet0.25``.

    Raises:
        WeightsMissing: neither file is present; the line names the production (ResNet-50) file.
    """
    for variant, key in RETINAFACE_WEIGHTS.items():
        if locate(WEIGHTS_BY_KEY[key]) is not None:
            return variant
    require(WEIGHTS_BY_KEY["retinaface_resnet50"])  # raises, with where to put it
    raise AssertionError("unreachable")

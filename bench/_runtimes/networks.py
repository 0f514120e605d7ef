"""The networks bench/runtimes.py times: each with its module, input shape, real test inputs, calibration inputs
and accuracy check against eager fp32.

Test inputs come from the shared people photos through the real Preprocessor (BlazeFace, FaceMesh, alignment,
crops, dlib's chip); calibration inputs are the ones the workers use (``shared.ml.nets.calibration``, made from
scikit-image's astronaut), so the int8 rows are checked on faces they were not calibrated on.
"""
from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
# The shared data beside the checkout (or beside the folder of worktrees), or GESTALT_SHARED_DATA.
_DATA = [Path(os.environ["GESTALT_SHARED_DATA"])] if os.environ.get("GESTALT_SHARED_DATA") else [
    ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data"]
PEOPLE = next((d for d in _DATA if d.is_dir()), _DATA[0]) / "faces" / "people"
MAX_SIDE = 1024
COSINE = 0.999  # a descriptor's cosine to eager fp32, each face
TOP_K = 10  # the ranking compared: the top 10 syndromes of the aggregate, in order
BOX_IOU = 0.9  # the main face's box against eager fp32's, each photo


@dataclass
class Network:
    name: str
    module: nn.Module
    shape: tuple[int, ...]
    inputs: np.ndarray  # real test items, float32 N x shape
    calibration: np.ndarray | None
    check: Callable[[tuple[np.ndarray, ...], tuple[np.ndarray, ...]], tuple[str, bool]]
    note: str = ""
    channels_last: bool = False  # torch runtimes: hand inputs over in NHWC
    int8_judged: bool = True  # False for random weights: int8 accuracy means nothing there
    batches: tuple[int, ...] = field(default=(1, 8, 64))
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (runtime, why) of runtimes that could not run


def _photos(limit: int) -> list[np.ndarray]:
    """Up to ``limit`` people photos, at most MAX_SIDE pixels; without the shared data, the calibration photo's
    variants (then the accuracy checks are not on held-out faces, and the bench says so)."""
    if not PEOPLE.is_dir():
        from skimage import data

        from shared.ml.nets.calibration import VARIANTS, _variant

        print(f"{PEOPLE} is absent: testing on the calibration photo's variants, not on held-out faces")
        return [_variant(data.astronaut(), *v) for v in VARIANTS][:limit]
    out = []
    for path in sorted(PEOPLE.glob("img*.jpg"))[:limit]:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        s = MAX_SIDE / max(rgb.shape[:2])
        out.append(cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else rgb)
    return out


@functools.lru_cache(maxsize=1)
def faces(limit: int) -> tuple:
    """The aligned faces of the people photos (those the preprocessing accepts), every region cut."""
    from shared.ml.preprocess.pipeline import Preprocessed, Preprocessor
    from shared.ml.preprocess.regions import ALL_REGIONS

    pre = Preprocessor(regions=ALL_REGIONS)
    try:
        done = pre.run_batch(_photos(limit))
    finally:
        pre.close()
    return tuple(p.aligned for p in done if isinstance(p, Preprocessed))


def _int8(args) -> bool:
    """Whether a statically quantised runtime is asked for (only it needs the calibration inputs)."""
    return "onnx-int8" in args.runtimes


def _cosine_check(ref: tuple[np.ndarray, ...], out: tuple[np.ndarray, ...]) -> tuple[str, bool]:
    a, b = ref[0], out[0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return f"descriptor cosine min {cos.min():.5f}", bool(cos.min() >= COSINE)


def encoder(args) -> Network:
    from shared.ml.nets.calibration import chips_calibration
    from shared.ml.nets.encoder import load_encoder

    chips = np.stack([f.chip for f in faces(args.photos)]).transpose(0, 3, 1, 2)
    return Network("encoder (dlib ResNet, 150 px chip)", load_encoder("cpu"), (3, 150, 150),
                   np.ascontiguousarray(chips, np.float32), chips_calibration() if _int8(args) else None, _cosine_check)


def _ranking_check(ref: tuple[np.ndarray, ...], out: tuple[np.ndarray, ...]) -> tuple[str, bool]:
    p_ref, p_out = (torch.softmax(torch.from_numpy(r[0]), -1).numpy() for r in (ref, out))
    agg_ref, agg_out = p_ref.mean(1), p_out.mean(1)
    top_ref, top_out = (np.argsort(-a, axis=1)[:, :TOP_K] for a in (agg_ref, agg_out))
    changed = int((top_ref != top_out).any(1).sum())
    top1 = int((top_ref[:, 0] != top_out[:, 0]).sum())
    diff = float(np.abs(p_ref - p_out).max())
    return (f"max abs prob diff {diff:.1e}; top-{TOP_K} changed {changed}/{len(top_ref)}, top-1 {top1}",
            changed == 0)


def regions(args) -> Network:
    from shared.ml.nets.calibration import crops_calibration
    from shared.ml.nets.ensemble import RegionalEnsemble, WithFeatures, crops_to_tensor, prepare_for_inference
    from shared.ml.preprocess.regions import DEFAULT_REGIONS

    torch.manual_seed(0)
    model = prepare_for_inference(RegionalEnsemble(DEFAULT_REGIONS, args.classes, width=args.width), "cpu")
    crops = np.stack([np.stack([f.crops[r] for r in DEFAULT_REGIONS]) for f in faces(args.photos)])
    return Network(f"regional CASIA-Nets ({len(DEFAULT_REGIONS)} regions, width {args.width}, {args.classes} "
                   "classes)", WithFeatures(model), (len(DEFAULT_REGIONS), 1, 100, 100),
                   crops_to_tensor(crops).numpy(),
                   crops_to_tensor(crops_calibration(DEFAULT_REGIONS)).numpy() if _int8(args) else None,
                   _ranking_check,
                   note="random init (no trained model ships): near-uniform scores make the ranking check strict",
                   batches=(1, 8, args.infer_batch))


def _letterbox(rgb: np.ndarray, side: int = 640) -> np.ndarray:
    s = min(1.0, side / max(rgb.shape[:2]))
    small = cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else rgb
    out = np.zeros((side, side, 3), np.uint8)
    out[:small.shape[0], :small.shape[1]] = small[:side, :side]
    return out


def _main_box(out: tuple[np.ndarray, ...]) -> np.ndarray:
    from retinaface.box_utils import decode
    from retinaface.prior_box import priorbox

    loc, conf = torch.from_numpy(out[0]), torch.from_numpy(out[1])
    priors = priorbox(min_sizes=[[16, 32], [64, 128], [256, 512]], steps=[8, 16, 32], clip=False,
                      image_size=(640, 640))
    best = conf[..., 1].argmax(1)
    return np.stack([decode(loc[i, b][None], priors[b][None], [0.1, 0.2])[0].numpy() for i, b in enumerate(best)])


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    lo, hi = np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), 1)
    area = np.prod(a[:, 2:] - a[:, :2], 1) + np.prod(b[:, 2:] - b[:, :2], 1) - inter
    return inter / area


def _detector_check(ref: tuple[np.ndarray, ...], out: tuple[np.ndarray, ...]) -> tuple[str, bool]:
    iou = _iou(_main_box(ref), _main_box(out))
    diff = float(np.abs(ref[1][..., 1].max(1) - out[1][..., 1].max(1)).max())
    return (f"main face IoU min {iou.min():.3f}, best score diff {diff:.1e}",
            bool(iou.min() >= BOX_IOU and diff <= 0.05))


def retinaface(args) -> Network:
    from shared.ml.formats.weights import WEIGHTS_BY_KEY, locate
    from shared.ml.nets.calibration import VARIANTS, _variant
    from shared.ml.preprocess.detection import RetinaFaceDetector

    shipped = PEOPLE.parents[1] / "weights" / "retinaface_mobilenet0.25.pth"  # the shared data's copy
    path = locate(WEIGHTS_BY_KEY["retinaface_mobilenet"]) or shipped
    det = RetinaFaceDetector("mobilenet0.25", device="cpu", path=str(path))

    def tensor(photos: list[np.ndarray]) -> np.ndarray:
        boxed = [_letterbox(p) for p in photos]
        return det._tensor(boxed, 640, 640).numpy()

    from skimage import data

    calibration = tensor([_variant(data.astronaut(), *v) for v in VARIANTS]) if _int8(args) else None
    return Network("RetinaFace MobileNet-0.25 (640 px canvas)", det.net, (3, 640, 640), tensor(_photos(args.photos)),
                   calibration, _detector_check, note="per photo", channels_last=False, batches=(1, 8))


def _max_diff_check(ref: tuple[np.ndarray, ...], out: tuple[np.ndarray, ...]) -> tuple[str, bool]:
    diff = max(float(np.abs(r - o).max()) for r, o in zip(ref, out, strict=True))
    scale = max(float(np.abs(r).max()) for r in ref)
    return f"max abs diff {diff:.1e} (outputs up to {scale:.1e})", diff <= 1e-3 * max(scale, 1.0)


def retinaface_r50(args) -> Network:
    from retinaface.network import RetinaFace

    torch.manual_seed(0)
    net = RetinaFace(name="Resnet50", pretrained=False, return_layers={"layer2": 1, "layer3": 2, "layer4": 3},
                     in_channels=256, out_channels=256).eval()
    x = np.random.default_rng(0).normal(size=(4, 3, 640, 640)).astype(np.float32)
    return Network("RetinaFace ResNet-50 (random weights)", net.to(memory_format=torch.channels_last), (3, 640, 640),
                   x, None, _max_diff_check, note="weights absent here: time only", channels_last=True,
                   int8_judged=False, batches=(1,))


def fan(args) -> Network:
    from face_alignment.models import FAN

    torch.manual_seed(0)
    x = np.random.default_rng(0).uniform(size=(4, 3, 256, 256)).astype(np.float32)
    return Network("FAN 2D-4 (random weights)", FAN(4).eval().to(memory_format=torch.channels_last), (3, 256, 256),
                   x, None, _max_diff_check, note="weights absent here: time only", channels_last=True,
                   int8_judged=False, batches=(1,))


BUILDERS = {"encoder": encoder, "regions": regions, "retinaface": retinaface, "retinaface-r50": retinaface_r50,
            "fan": fan}

"""Synthetic facial phenotypes: landmark-guided geometric warps of real faces.

Each warp moves a group of landmarks the way a dysmorphic feature would and drags the
surrounding skin along with a thin-plate spline, leaving the other landmarks (and the
image border) in place:

* ``hypertelorism``: both eyes (and, half as far, the brows) move apart.
* ``downslanting``: each eye turns about its centre so that its outer corner drops
  (downslanting palpebral fissures).
* ``long_philtrum``: the lips move down, away from the nose, towards the chin.

Every output, including an ``unaffected`` one, goes through the same resampling with a
small random landmark jitter, so a classifier can only tell the classes apart by the
geometry and not by interpolation blur. Gestalt uses these sets to check that training
and transfer work, and which region sees which feature; they are not patient data.

Landmarks are in the 68-point scheme (``shared.ml.preprocess.landmarks``), in the coordinates of the
image being warped; 468-point FaceMesh landmarks are mapped onto it.
"""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy.interpolate import RBFInterpolator

from shared.ml.preprocess.regions import crop_regions

UNAFFECTED = "unaffected"
WARPS = ("hypertelorism", "downslanting", "long_philtrum")
CLASSES = (UNAFFECTED, *WARPS)
# The region expected to carry each warp, and one that cannot see it (region boxes in shared.ml.preprocess.regions).
CONTAINING_REGION = {"hypertelorism": "upper_half", "downslanting": "upper_half", "long_philtrum": "lower_half"}
BLIND_REGION = {"hypertelorism": "lower_half", "downslanting": "lower_half", "long_philtrum": "upper_half"}

# 68-point groups (0-based, "left" as seen in the image).
JAW = np.arange(0, 17)
BROW_LEFT, BROW_RIGHT = np.arange(17, 22), np.arange(22, 27)
NOSE = np.arange(27, 36)
EYE_LEFT, EYE_RIGHT = np.arange(36, 42), np.arange(42, 48)
LIPS = np.arange(48, 68)

# Full-strength sizes, relative to the inter-ocular distance (eye centre to eye centre).
HYPERTELORISM_SHIFT = 0.15  # each eye moves outward by this much
DOWNSLANT_DEGREES = 20.0
PHILTRUM_SHIFT = 0.18
JITTER = 0.012  # random per-landmark displacement (standard deviation) applied to every output


def landmarks_68(landmarks: np.ndarray) -> np.ndarray:
    """68 points from 68 (as is) or 468 FaceMesh points."""
    pts = np.asarray(landmarks, np.float64)
    if len(pts) == 68:
        return pts
    if len(pts) == 468:
        from shared.ml.preprocess.landmarks import MESH_TO_68

        return pts[MESH_TO_68]
    raise ValueError(f"expected 68 or 468 landmarks, got {len(pts)}")


def inter_ocular(pts: np.ndarray) -> float:
    return float(np.linalg.norm(pts[EYE_RIGHT].mean(axis=0) - pts[EYE_LEFT].mean(axis=0)))


def displaced(pts: np.ndarray, kind: str, strength: float) -> np.ndarray:
    """Where each of the 68 landmarks goes under warp ``kind`` at ``strength`` (0: none, 1: full).

    Raises:
        ValueError: for an unknown warp.
    """
    out = pts.copy()
    iod = inter_ocular(pts)
    if kind == UNAFFECTED:
        return out
    if kind == "hypertelorism":
        shift = HYPERTELORISM_SHIFT * iod * strength
        out[EYE_LEFT, 0] -= shift
        out[EYE_RIGHT, 0] += shift
        out[BROW_LEFT, 0] -= shift / 2
        out[BROW_RIGHT, 0] += shift / 2
    elif kind == "downslanting":
        angle = np.radians(DOWNSLANT_DEGREES * strength)
        # Image-left eye: its outer corner (smaller x) goes down (larger y); mirrored for the other eye.
        for group, sign in ((EYE_LEFT, -1.0), (EYE_RIGHT, 1.0)):
            c, s = np.cos(sign * angle), np.sin(sign * angle)
            centre = pts[group].mean(axis=0)
            rel = pts[group] - centre
            out[group] = centre + rel @ np.array([[c, s], [-s, c]])
    elif kind == "long_philtrum":
        out[LIPS, 1] += PHILTRUM_SHIFT * iod * strength
    else:
        raise ValueError(f"unknown warp {kind!r}; known: {', '.join(CLASSES)}")
    return out


def _border(shape: tuple[int, ...], per_side: int = 5) -> np.ndarray:
    h, w = shape[:2]
    xs, ys = np.linspace(0, w - 1, per_side), np.linspace(0, h - 1, per_side)
    return np.unique(np.concatenate([
        np.stack([xs, np.zeros_like(xs)], 1), np.stack([xs, np.full_like(xs, h - 1)], 1),
        np.stack([np.zeros_like(ys), ys], 1), np.stack([np.full_like(ys, w - 1), ys], 1)]), axis=0)


def thin_plate_warp(image: np.ndarray, src: np.ndarray, dst: np.ndarray, step: int = 4) -> np.ndarray:
    """Resample ``image`` so that the content at points ``src`` lands on ``dst`` (the border stays put).

    A thin-plate spline maps every output pixel back to where it comes from (``dst`` -> ``src``).
    """
    border = _border(image.shape)
    dst_all = np.concatenate([dst, border])
    offsets = np.concatenate([src - dst, np.zeros_like(border)])
    spline = RBFInterpolator(dst_all, offsets, kernel="thin_plate_spline")
    h, w = image.shape[:2]
    # The spline is smooth: evaluate it on a coarse grid and interpolate the offsets in between.
    gx, gy = np.linspace(0, w - 1, -(-w // step) + 1), np.linspace(0, h - 1, -(-h // step) + 1)
    coarse = np.stack(np.meshgrid(gx, gy), -1).reshape(-1, 2)
    off = spline(coarse).reshape(len(gy), len(gx), 2).astype(np.float32)
    off = cv2.resize(off, (w, h), interpolation=cv2.INTER_LINEAR)
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    map_x, map_y = xs + off[..., 0], ys + off[..., 1]
    return cv2.remap(image, map_x, map_y, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def warp_face(image: np.ndarray, landmarks: np.ndarray, kind: str, strength: float = 1.0,
              rng: np.random.Generator | None = None, jitter: float = JITTER) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic phenotype of a real face.

    Args:
        image: the face (grayscale or colour), e.g. the aligned canvas.
        landmarks: its 68 (or 468) landmarks, in ``image`` pixels.
        kind: ``unaffected`` or one of :data:`WARPS`.
        strength: 0 (no change) to 1 (full size, see the module constants).
        rng: draws the jitter every output gets; None for no jitter.
        jitter: standard deviation of the jitter, relative to the inter-ocular distance.

    Returns:
        The warped image and its 68 landmarks.
    """
    pts = landmarks_68(landmarks)
    dst = displaced(pts, kind, strength)
    if rng is not None and jitter > 0:
        dst = dst + rng.normal(0.0, jitter * inter_ocular(pts), size=dst.shape)
    return thin_plate_warp(image, pts, dst), dst


@dataclass
class SyntheticSet:
    crops: np.ndarray  # N x R x 100 x 100 uint8
    classes: tuple[str, ...]
    labels: np.ndarray  # N, indices into classes
    source: np.ndarray  # N, index of the real face each sample was made from
    strength: np.ndarray  # N


def synthetic_phenotypes(aligned: np.ndarray, landmarks: np.ndarray, regions: tuple[str, ...],
                         classes: tuple[str, ...] = CLASSES, strength: tuple[float, float] = (0.7, 1.0),
                         seed: int = 0) -> SyntheticSet:
    """Every class (``unaffected`` and warps) of every aligned face, cut into region crops.

    Args:
        aligned: ``F x 200 x 200`` aligned grayscale faces.
        landmarks: ``F x L x 2`` their landmarks on the aligned canvas.
        regions: crops to cut, in order.
        classes: ``unaffected`` and/or names from :data:`WARPS`; one sample of each per face.
        strength: range of the random warp strength.
        seed: seeds the strengths and jitter.
    """
    rng = np.random.default_rng(seed)
    crops, labels, source, strengths = [], [], [], []
    for i, (face, pts) in enumerate(zip(aligned, landmarks, strict=True)):
        for label, kind in enumerate(classes):
            s = 0.0 if kind == UNAFFECTED else float(rng.uniform(*strength))
            warped, _ = warp_face(face, pts, kind, s, rng)
            cut = crop_regions(warped, regions)
            crops.append(np.stack([cut[r] for r in regions]))
            labels.append(label)
            source.append(i)
            strengths.append(s)
    return SyntheticSet(np.stack(crops), tuple(classes), np.asarray(labels, np.int64), np.asarray(source),
                        np.asarray(strengths))

"""Calibration inputs for the int8 runtime: the networks' typical inputs, made from a photo that ships with
scikit-image.

Static int8 quantisation (``onnx-int8``, :mod:`shared.ml.runtime.onnx`) sets each activation's range from the
inputs it is shown. Gestalt ships no patient photos, so these are the face of ``skimage.data.astronaut()`` (a
public-domain NASA portrait) in a fixed set of variants: brighter and darker, lower and higher contrast, turned a
little, smaller, in grey, mirrored. Each variant goes through the real preprocessing (BlazeFace, FaceMesh, the
alignment, the region crops and dlib's face chip). The set is the same on every machine, so every worker
quantises a network to the same model, and a photo's scores do not depend on which worker scored it.
``bench/runtimes.py`` checks the result on other people's photos.
"""
from __future__ import annotations

import functools

import cv2
import numpy as np

# (gain, gamma, degrees, scale, grey, mirrored) of each variant of the photo.
VARIANTS = (
    (1.0, 1.0, 0, 1.0, False, False), (0.6, 1.0, 0, 1.0, False, False), (1.3, 1.0, 0, 1.0, False, False),
    (1.0, 0.6, 0, 1.0, False, False), (1.0, 1.6, 0, 1.0, False, False), (1.0, 1.0, 8, 1.0, False, False),
    (1.0, 1.0, -8, 1.0, False, False), (1.0, 1.0, 0, 0.5, False, False), (0.8, 1.0, 4, 0.7, True, False),
    (1.0, 1.0, 0, 1.0, False, True), (1.2, 0.8, -4, 0.8, False, True), (0.7, 1.3, 0, 1.0, True, True),
)


def _variant(rgb: np.ndarray, gain: float, gamma: float, degrees: float, scale: float, grey: bool,
             mirrored: bool) -> np.ndarray:
    out = np.clip(255.0 * (rgb / 255.0) ** gamma * gain, 0, 255).astype(np.uint8)
    if grey:
        out = cv2.cvtColor(cv2.cvtColor(out, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    if degrees:
        h, w = out.shape[:2]
        out = cv2.warpAffine(out, cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0), (w, h),
                             borderMode=cv2.BORDER_REFLECT)
    if scale != 1.0:
        out = cv2.resize(out, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(out[:, ::-1] if mirrored else out)


@functools.lru_cache(maxsize=1)
def calibration_faces() -> tuple:
    """The aligned faces of the variants (``shared.ml.preprocess.pipeline.AlignedFace``), every region cut."""
    from skimage import data

    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.preprocess.regions import ALL_REGIONS

    photo = data.astronaut()
    pre = Preprocessor(regions=ALL_REGIONS)
    try:
        return tuple(pre.run(_variant(photo, *v)).aligned for v in VARIANTS)
    finally:
        pre.close()


def chips_calibration() -> np.ndarray:
    """The identity encoder's calibration inputs: the variants' face chips and their region cuts (what the
    encoder's members read), and their mirror images, float ``N x 3 x 150 x 150`` in pixel units (as
    :func:`shared.ml.nets.encoder.encode` feeds the network)."""
    faces = calibration_faces()
    chips = np.stack([face.chip for face in faces] + [cut for face in faces for cut in (face.cuts or {}).values()])
    chips = np.concatenate([chips, chips[:, :, ::-1]])
    return np.ascontiguousarray(chips.transpose(0, 3, 1, 2), np.float32)


def crops_calibration(regions: tuple[str, ...]) -> np.ndarray:
    """The regional ensemble's calibration crops for ``regions`` and their mirror images, uint8
    ``N x R x 100 x 100`` (:func:`shared.ml.nets.ensemble.crops_to_tensor` makes them the network's input)."""
    crops = np.stack([np.stack([face.crops[r] for r in regions]) for face in calibration_faces()])
    return np.ascontiguousarray(np.concatenate([crops, crops[..., ::-1]]))

"""Facial regions as boxes on the aligned canvas, cut as 100x100 grayscale crops.

The canvas is aligned to landmarks (see ``alignment.TEMPLATE``: eye centres at (70, 85) and
(130, 85), nose tip at (100, 120), mouth corners at (76, 148) and (124, 148)), so each box
is anchored to landmark positions and the same box covers the same anatomy on every face.
Boxes are fixed rather than fitted per face on purpose: a box that followed each face's own
landmarks would be rescaled to 100x100 by a different amount per face and would erase the
very proportions (wide-set eyes, a long philtrum) that the networks must see.

The four regions of the paper's Table 2:

* ``full_face``: hairline to chin, x 15-185, y 15-190.
* ``upper_half``: forehead to just below the eyes' lower lids and the nose bridge, y 15-110.
* ``middle_face``: ear to ear across eyes, nose and cheeks, x 0-200, y 60-150.
* ``lower_half``: nose tip to chin, y 105-195.

Three smaller regions for finer phenotypes:

* ``eyes`` (periocular): brows to lower lids, outer canthus to outer canthus plus margin, x 35-165, y 55-110.
* ``nose``: bridge between the eyes to the nostrils' base, x 68-132, y 78-138.
* ``mouth`` (mouth and philtrum): subnasale to below the lower lip, x 58-142, y 118-178.

``docs/regions.png`` (made by ``docs/make_regions_figure.py``) draws them on a real face.
"""
from __future__ import annotations

import cv2
import numpy as np

CROP_SIZE = 100
REGIONS: dict[str, tuple[int, int, int, int]] = {
    "full_face": (15, 15, 185, 190),
    "upper_half": (15, 15, 185, 110),
    "middle_face": (0, 60, 200, 150),
    "lower_half": (30, 105, 170, 195),
    "eyes": (35, 55, 165, 110),
    "nose": (68, 78, 132, 138),
    "mouth": (58, 118, 142, 178),
}
# The paper's four regions: what a model uses unless its config names others.
DEFAULT_REGIONS = ("full_face", "upper_half", "middle_face", "lower_half")
ALL_REGIONS = tuple(REGIONS)


def crop_regions(aligned_gray: np.ndarray, regions: tuple[str, ...] = DEFAULT_REGIONS) -> dict[str, np.ndarray]:
    """Cut each region from the aligned grayscale canvas and resize it to 100x100.

    Raises:
        ValueError: for a region name that is not defined here.
    """
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"unknown region(s) {', '.join(unknown)}; known: {', '.join(REGIONS)}")
    crops = {}
    for name in regions:
        x0, y0, x1, y1 = REGIONS[name]
        patch = aligned_gray[y0:y1, x0:x1]
        crops[name] = cv2.resize(patch, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
    return crops


# The identity encoder's input size: the encoder-based regional members read each region cut at this size, in colour.
CUT_SIZE = 150
CUT_PREFIX = "cut_"


def cut_name(region: str) -> str:
    """The stored name of ``region``'s colour cut (beside its 100 x 100 grayscale crop of the same name)."""
    return CUT_PREFIX + region


def cut_regions(image_rgb: np.ndarray, canvas_from_photo: np.ndarray, regions: tuple[str, ...] = DEFAULT_REGIONS,
                size: int = CUT_SIZE) -> dict[str, np.ndarray]:
    """Each region's box on the aligned canvas, cut from the photo itself at ``size`` x ``size`` RGB.

    The same boxes as :func:`crop_regions`, stretched to a square the same way (so a wide-set pair of eyes stays
    wide), but sampled from the photo through the alignment (``canvas_from_photo``: the 2 x 3 photo -> canvas
    matrix) rather than from the 200 px canvas, so that a cut at the encoder's 150 px keeps the photo's detail. A
    photo much larger than the cut is first halved (OpenCV's Gaussian pyramid, on the face's neighbourhood only)
    until a cut pixel spans at most two photo pixels, so the bilinear sampling does not alias.
    """
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"unknown region(s) {', '.join(unknown)}; known: {', '.join(REGIONS)}")
    photo_from_canvas = np.vstack([cv2.invertAffineTransform(np.asarray(canvas_from_photo, np.float64)), [0, 0, 1]])
    boxes = np.array([REGIONS[r] for r in regions], np.float64)
    corners = np.concatenate([boxes[:, [0, 1]], boxes[:, [2, 1]], boxes[:, [0, 3]], boxes[:, [2, 3]]])
    in_photo = corners @ photo_from_canvas[:2, :2].T + photo_from_canvas[:2, 2]
    spread = float(np.hypot(*photo_from_canvas[0, :2])) * float((boxes[:, 2:] - boxes[:, :2]).max()) / size
    levels = 0
    while spread / 2 ** levels > 2.0:
        levels += 1
    # Only the face's neighbourhood (with a margin for the pyramid's filter) is resampled.
    h, w = image_rgb.shape[:2]
    margin = 4 * 2 ** levels
    x0, y0 = np.maximum(np.floor(in_photo.min(0)).astype(int) - margin, 0)
    x1, y1 = np.minimum(np.ceil(in_photo.max(0)).astype(int) + margin, (w, h))
    source, ox, oy = (image_rgb[y0:y1, x0:x1], x0, y0) if x1 - x0 > 8 and y1 - y0 > 8 else (image_rgb, 0, 0)
    for _ in range(levels):
        source = cv2.pyrDown(source)
    s = 2.0 ** -levels  # pyramid level pixel = photo pixel (relative to the neighbourhood) / 2^levels
    level_from_photo = np.array([[s, 0.0, -ox * s], [0.0, s, -oy * s], [0.0, 0.0, 1.0]])
    cuts = {}
    for name, (bx0, by0, bx1, by1) in zip(regions, boxes, strict=True):
        sx, sy = (bx1 - bx0) / size, (by1 - by0) / size  # canvas pixels per cut pixel
        canvas_from_cut = np.array([[sx, 0.0, bx0 + 0.5 * sx - 0.5], [0.0, sy, by0 + 0.5 * sy - 0.5], [0, 0, 1.0]])
        m = (level_from_photo @ photo_from_canvas @ canvas_from_cut)[:2]
        cuts[name] = cv2.warpAffine(source, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_REPLICATE)
    return cuts

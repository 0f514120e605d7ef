"""Facial regions as boxes on the aligned canvas, cut as 100x100 grayscale crops.

The four regions of the paper's Table 2. Because the canvas is aligned to landmark
positions (see ``alignment.TEMPLATE``), each box is anchored to landmarks:

* ``full_face``: hairline to chin, x 15-185, y 15-190.
* ``upper_half``: forehead to just below the eyes' lower lids and the nose bridge, y 15-110.
* ``middle_face``: ear to ear across eyes, nose and cheeks, x 0-200, y 60-150.
* ``lower_half``: nose tip to chin, y 105-195.
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
}
DEFAULT_REGIONS = tuple(REGIONS)


def crop_regions(aligned_gray: np.ndarray, regions: tuple[str, ...] = DEFAULT_REGIONS) -> dict[str, np.ndarray]:
    """Cut each region from the aligned grayscale canvas and resize it to 100x100."""
    crops = {}
    for name in regions:
        x0, y0, x1, y1 = REGIONS[name]
        patch = aligned_gray[y0:y1, x0:x1]
        crops[name] = cv2.resize(patch, (CROP_SIZE, CROP_SIZE), interpolation=cv2.INTER_AREA)
    return crops

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

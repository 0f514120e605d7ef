"""Offline preprocessing on real photos: detection, alignment to the template, region crops."""
from __future__ import annotations

import numpy as np
import pytest
from skimage import data

from shared.ml.alignment import TEMPLATE
from shared.ml.imaging import ImageRejected
from shared.ml.landmarks import five_points
from shared.ml.preprocess import NO_FACE, Preprocessor
from shared.ml.regions import CROP_SIZE, REGIONS


@pytest.fixture(scope="module")
def pre():
    p = Preprocessor()
    yield p
    p.close()


def test_astronaut_face_is_found_aligned_and_cropped(pre):
    result = pre.run(data.astronaut())
    x0, y0, x1, y1 = result.face.box
    assert 160 < x0 < 200 and 250 < x1 < 300 and result.face.score > 0.5
    assert result.aligned.landmarks.shape == (468, 2)
    eyes = result.aligned.alignment.apply(five_points(result.aligned.landmarks))[:2]
    assert np.abs(eyes - TEMPLATE[:2]).max() < 6  # pixels on the 200 px canvas
    assert set(result.aligned.crops) == set(REGIONS)
    for crop in result.aligned.crops.values():
        assert crop.shape == (CROP_SIZE, CROP_SIZE) and crop.dtype == np.uint8 and crop.std() > 10


def test_photo_without_face_is_rejected_with_reason(pre):
    with pytest.raises(ImageRejected) as err:
        pre.run(data.coffee())
    assert err.value.reason == NO_FACE


def test_main_face_is_the_largest(pre):
    big = data.astronaut()
    small = big[::3, ::3]
    canvas = np.full((700, 900, 3), 200, np.uint8)
    canvas[100:612, 300:812] = big
    canvas[20:191, 20:191] = small
    face, found = pre.detect(canvas)
    assert found >= 1
    assert face.box[0] > 300  # the big face, not the small one

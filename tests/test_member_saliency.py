"""Saliency through every member: the weighted map follows the members that decide, and it localises (masking the
part of the face it marks hottest moves the score more than masking elsewhere).

A small encoder model is fitted on the screening task (ORL faces warped to hypertelorism or resampled unaffected,
docs/examples/make_screening_example.py): the evidence is the eyes' spacing, so a map that localises points there.
"""
from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from shared.ml.explain.saliency import chip_placement, member_heatmap_png, member_maps, weighted_map
from shared.ml.members.model import predict
from shared.ml.members.stack import Stack
from shared.ml.preprocess.facechip import face_chip
from shared.ml.preprocess.regions import DEFAULT_REGIONS, crop_regions, cut_name, cut_regions
from tests.conftest import shared_data

POSITIVE = "hypertelorism"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """An encoder model (frozen encoder) on warped ORL faces, and a few held-out positives with their alignment."""
    from shared.ml.nets.encoder import CONVERTED_SHA256
    from shared.ml.preprocess.imaging import ImageRejected, decode_upload
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.train.data import Sample
    from shared.ml.train.members import encoder_fn, fit_encoder_model
    from shared.ml.train.prepared import prepare
    from shared.ml.train.warps import UNAFFECTED, warp_face

    orl = shared_data("faces", "orl")
    pre, rng = Preprocessor(), np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("warped")
    samples, held = [], []
    for s in range(1, 17):
        for i in range(1, 11):
            rgb = decode_upload((orl / f"s{s}" / f"{i}.pgm").read_bytes(), max_bytes=2**24, max_pixels=4e7,
                                min_side=32).rgb
            rgb = cv2.resize(rgb, None, fx=2, fy=2, interpolation=cv2.INTER_CUBIC)  # room for the warp's margins
            label = POSITIVE if i % 2 else UNAFFECTED
            try:
                warped, _ = warp_face(rgb, pre.run(rgb).aligned.landmarks, label, 1.0, rng)
            except ImageRejected:
                continue
            if s > 13:  # held out: three people
                if label == POSITIVE:
                    held.append(warped)
                continue
            path = folder / f"s{s}-{i}.png"
            cv2.imwrite(str(path), cv2.cvtColor(warped, cv2.COLOR_RGB2BGR))
            samples.append(Sample(path, label, f"s{s}"))
    data = prepare(samples, [POSITIVE, UNAFFECTED], pre, progress=False)
    encode = encoder_fn("cpu")
    model, _ = fit_encoder_model(data, [POSITIVE, UNAFFECTED], np.arange(len(data.samples)), [], encode,
                                 CONVERTED_SHA256)
    faces = []
    for photo in held:
        try:
            faces.append((photo, pre.run(photo).aligned))
        except ImageRejected:  # a few warped ORL faces fall under the gate's smallest face
            continue
    assert len(faces) >= 6
    return model, encode, faces


def _crops(photo: np.ndarray, aligned) -> dict[str, np.ndarray]:
    """One face's crops cut from ``photo`` with the face's own alignment (a masked photo keeps its alignment)."""
    m = aligned.alignment.matrix
    canvas = cv2.warpAffine(photo, m, (200, 200), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    gray = cv2.cvtColor(canvas, cv2.COLOR_RGB2GRAY)
    crops = {r: c[None] for r, c in crop_regions(gray, DEFAULT_REGIONS).items()}
    crops["face_chip"] = face_chip(photo, aligned.landmarks)[None]
    crops.update({cut_name(r): c[None] for r, c in cut_regions(photo, m, DEFAULT_REGIONS).items()})
    return crops


def _masked(photo: np.ndarray, aligned, box: tuple[int, int, int, int]) -> np.ndarray:
    """``photo`` with the canvas square ``box`` filled with the face's mean colour (through the alignment)."""
    x0, y0, x1, y1 = box
    mask = np.zeros((200, 200), np.uint8)
    mask[y0:y1, x0:x1] = 255
    inverse = cv2.invertAffineTransform(aligned.alignment.matrix)
    on_photo = cv2.warpAffine(mask, inverse, photo.shape[1::-1], flags=cv2.INTER_NEAREST) > 0
    out = photo.copy()
    out[on_photo] = photo.reshape(-1, 3).mean(0).astype(np.uint8)
    return out


def test_the_weighted_map_follows_the_members_that_decide(fitted):
    model, encode, faces = fitted
    photo, aligned = faces[0]
    crops = _crops(photo, aligned)
    placed = chip_placement(aligned.alignment.apply(aligned.landmarks), model.contract)
    maps = member_maps(model, crops, 0, encode.net, placed)
    assert set(maps) == set(model.names) and all(m.shape == (200, 200) for m in maps.values())
    identity_only = dataclasses.replace(model, stack=Stack(model.names, np.eye(len(model.names))[-1], np.zeros(2)))
    regions_only = dataclasses.replace(model, stack=Stack(model.names, np.r_[np.ones(4), 0.0], np.zeros(2)))
    a = weighted_map(identity_only, crops, 0, maps=maps)
    b = weighted_map(regions_only, crops, 0, maps=maps)
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] < 0.9  # the identity member's own map, not the regions'
    # A member's own map on request, and the weighted default, as the portal draws them.
    png = member_heatmap_png(model, crops, cv2.warpAffine(photo, aligned.alignment.matrix, (200, 200)), 0,
                             "identity", encode.net, placed)
    assert png.startswith(b"\x89PNG")


def _log_odds(model, crops, encode) -> float:
    """The aggregate's log-odds of the positive class: it moves where a confident probability saturates."""
    p = float(np.clip(predict(model, crops, encode).aggregate[0, 0], 1e-7, 1 - 1e-7))
    return float(np.log(p / (1 - p)))


def test_masking_the_hottest_part_moves_the_score_more_than_masking_elsewhere(fitted):
    model, encode, faces = fitted
    side, rng = 40, np.random.default_rng(0)
    hot_drops, random_drops = [], []
    for photo, aligned in faces:
        crops = _crops(photo, aligned)
        before = _log_odds(model, crops, encode)
        placed = chip_placement(aligned.alignment.apply(aligned.landmarks), model.contract)
        heat = cv2.blur(weighted_map(model, crops, 0, encode.net, placed), (side, side))
        inner = heat[side // 2:200 - side // 2, side // 2:200 - side // 2]  # centres of squares on the canvas
        y, x = np.unravel_index(np.argmax(inner), inner.shape)
        box = (int(x), int(y), int(x) + side, int(y) + side)
        after = _log_odds(model, _crops(_masked(photo, aligned, box), aligned), encode)
        hot_drops.append(before - after)
        for _ in range(4):
            rx, ry = rng.integers(20, 200 - side - 20, 2)
            masked = _masked(photo, aligned, (int(rx), int(ry), int(rx) + side, int(ry) + side))
            random_drops.append(before - _log_odds(model, _crops(masked, aligned), encode))
    print("log-odds drop, hottest square:", np.round(hot_drops, 3), "random squares (mean):",
          round(float(np.mean(random_drops)), 3))
    assert np.mean(hot_drops) > np.mean(random_drops)

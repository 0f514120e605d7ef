"""Head pose from a 3D mean face, on photos of known pose, and what the gate does with a turned face.

Photos of known pose are drawn from real faces (``tests/posed_faces.py``): the face texture-mapped
onto its own FaceMesh, surrounded by rings of the head, turned in 3D. Two errors are measured:

* the pose fitted to the drawn face's exact landmarks (the projected mesh points): the error of the
  3D model and the fit alone;
* the pose the whole preprocessing path reports for the drawn photo (detector, levelling, FaceMesh
  landmarks, fit): what a user gets. FaceMesh draws a turned face's landmarks somewhat towards a
  frontal one (the far eye's corners and the face's outline spread out), so past 45 degrees it
  reads less than the true turn (measured: 60 degrees read as 42-52).
"""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from skimage import data

from shared.ml.preprocess.imaging import ImageRejected
from shared.ml.preprocess.pipeline import Preprocessor
from shared.ml.preprocess.pose import MEAN_FACE, MIRROR, euler, head_pose, rotation
from shared.ml.preprocess.quality import (
    FLAG_TEXT,
    MAX_TURN_DEGREES,
    NON_FRONTAL,
    TURNED,
    rejection,
    turned_faces,
)
from tests.conftest import SHARED_DATA
from tests.posed_faces import PosedFace

PEOPLE = SHARED_DATA / "faces" / "people"
# Faces that are drawn turned: the astronaut always, three people photos when the shared data is here.
SOURCES = ("img1.jpg", "img17.jpg", "img30.jpg")
EXACT_BOUND = 10.0
PIPELINE_BOUND = 10.0


@pytest.fixture(scope="module")
def pre():
    p = Preprocessor()
    yield p
    p.close()


@pytest.fixture(scope="module")
def faces(pre) -> dict[str, PosedFace]:
    photos = {"astronaut": data.astronaut()}
    for name in SOURCES if PEOPLE.is_dir() else ():
        im = Image.open(PEOPLE / name).convert("RGB")
        im.thumbnail((800, 800))
        photos[name] = np.asarray(im)
    out = {}
    for name, rgb in photos.items():
        found = pre.detect(rgb)
        assert found.rotation == 0
        out[name] = PosedFace(rgb, pre.mesh.mesh(rgb, found.face.box))
    return out


def test_mean_face_is_symmetric_and_rotations_round_trip():
    mirrored = MEAN_FACE[MIRROR] * (-1, 1, 1)
    assert np.abs(mirrored - MEAN_FACE).max() < 1e-3
    assert abs(np.linalg.norm(MEAN_FACE[36:42].mean(0) - MEAN_FACE[42:48].mean(0)) - 1) < 0.01
    for angles in [(0, 0, 0), (30, -10, 5), (-60, 20, -45), (10, 40, 170)]:
        assert np.allclose(euler(rotation(*angles)), angles)


def _error(estimate, truth) -> np.ndarray:
    return np.abs(np.asarray(estimate) - np.asarray(truth))


def test_pose_of_exact_landmarks_is_within_bound_up_to_60_degrees(faces):
    worst = 0.0
    for face in faces.values():
        for yaw in (-60, -45, -30, -15, 0, 15, 30, 45, 60):
            for pitch, roll in ((0, 0), (-30, 0), (30, 0), (20, 40), (-20, -40), (0, 60)):
                landmarks = face.landmarks(yaw, pitch, roll)
                pose = head_pose(landmarks * 3.1 + (40, -7))  # any scale and place in the photo
                worst = max(worst, _error((pose.yaw, pose.pitch, pose.roll), (yaw, pitch, roll)).max())
    print(f"exact landmarks: worst error {worst:.1f} degrees")
    assert worst < EXACT_BOUND


def test_pose_of_rendered_photos(pre, faces):
    """The whole path, yaw -60 to 60 with pitch up to 20 and roll up to 25 degrees."""
    errors: dict[int, list[float]] = {}
    refused = []
    combos = ((0, 0), (15, 20), (-15, -25))
    for n, (name, face) in enumerate(faces.items()):
        for i, yaw in enumerate((-60, -45, -30, -15, 0, 15, 30, 45, 60)):
            for pitch, roll in (combos[(n + i) % 3],):  # each face and yaw at one of the pitch and roll pairs
                try:
                    q = pre.run(face.draw(yaw, pitch, roll)).aligned.quality
                except ImageRejected as exc:
                    refused.append((name, yaw, pitch, roll, exc.reason))
                    continue
                err = _error((q["yaw_degrees"], q["pitch_degrees"], q["roll_degrees"]), (yaw, pitch, roll))
                errors.setdefault(abs(yaw), []).append(float(err.max()))
                assert (TURNED in q["flags"]) == (max(abs(q["yaw_degrees"]), abs(q["pitch_degrees"])) > 30)
    table = ", ".join(f"|yaw| {k}: median {np.median(v):.1f} max {max(v):.1f}" for k, v in sorted(errors.items()))
    print(f"rendered photos, error of the worst of yaw, pitch and roll (degrees): {table}; refused: {refused}")
    assert not [r for r in refused if abs(r[1]) <= 45], refused
    for k, v in errors.items():
        if k <= 30:
            assert max(v) < PIPELINE_BOUND, (k, v)
        else:  # FaceMesh reads large turns short (see the module doc); the median stays within the bound
            assert np.median(v) < PIPELINE_BOUND + 5 * (k > 45), (k, v)


def test_turned_face_is_scored_and_flagged_and_profile_refused(pre, faces):
    face = faces["astronaut"]
    frontal = pre.run(face.draw(0, 0, 0)).aligned.quality
    assert frontal["flags"] == [] and abs(frontal["yaw_degrees"]) < 8
    turned = pre.run(face.draw(45, 0, 0)).aligned.quality
    assert turned["flags"] == [TURNED] and FLAG_TEXT[TURNED] == "turned face: less reliable"
    assert 30 < turned["yaw_degrees"] < MAX_TURN_DEGREES
    # The jaw-asymmetry estimate this replaces read this face as 72 degrees and refused it.
    message = rejection({**turned, "yaw_degrees": 75.04})
    assert message == NON_FRONTAL.format(yaw=75.1) and "\n" not in message and "; upload" in message
    with pytest.raises(ImageRejected) as err:
        pre.run(face.draw(85, 0, 0))
    assert err.value.reason.startswith(("the face is turned too far", "no face was found", "the face could not"))


def test_flags_from_canvas_landmarks_match_the_stored_ones(pre, faces):
    """``gestalt evaluate`` recomputes the flag from the aligned face's landmarks: it must agree with the gate."""
    results = [pre.run(face.draw(yaw, 5, 10)).aligned for face in faces.values() for yaw in (0, 40, -45)]
    canvas = np.stack([a.alignment.apply(a.landmarks) for a in results])
    assert turned_faces(canvas).tolist() == [TURNED in a.quality["flags"] for a in results]
    assert any(turned_faces(canvas)) and not all(turned_faces(canvas))


def test_near_frontal_group_selfie_is_no_longer_read_as_turned_away(pre):
    """The main face of this selfie was refused as turned 54 degrees (jaw asymmetry); the 3D fit reads ~30."""
    path = PEOPLE / "selfie-many-people.jpg"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    q = pre.run(np.asarray(Image.open(path).convert("RGB"))).aligned.quality
    assert 15 < abs(q["yaw_degrees"]) < 45

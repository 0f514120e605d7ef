"""The whole path on the astronaut photo: upload -> awaiting_model -> train + activate -> ranked result.

Self-contained: it needs no shared data, and trains its own small model.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from skimage import data
from sqlalchemy import func, select, update

from shared.db import session_scope
from shared.ml.preprocess.alignment import CANVAS
from shared.ml.preprocess.imaging import encode_png
from shared.ml.preprocess.regions import ALL_REGIONS, DEFAULT_REGIONS, cut_name
from shared.modelops.crops import (
    ALIGNED_FACE,
    aligned_digest,
    aligned_face,
    aligned_face_png,
    load_crops,
    store_crops,
)
from shared.models import Crop, Face, ModelVersion, RegionScore, Result
from shared.storage import aligned_key, aligned_png_key, crops_prefix, get_storage
from tests.conftest import Portal, new_user, run_cli

pytestmark = pytest.mark.e2e


def _jpeg_with_exif(rgb: np.ndarray) -> bytes:
    im = Image.fromarray(rgb)
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"  # Make
    exif[0x8825] = {1: "N", 2: (52.0, 12.0, 0.0), 3: "E", 4: (0.0, 7.0, 0.0)}  # GPS
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif, quality=92)
    return buf.getvalue()


@pytest.fixture
def smoke_folder(tmp_path):
    """Two labels of astronaut variants (brightness, small shifts): a real, tiny training set."""
    base = data.astronaut()
    for label, flip in (("variant_a", False), ("variant_b", True)):
        (tmp_path / label).mkdir()
        for i, gain in enumerate((0.8, 0.9, 1.0, 1.1)):
            img = np.clip(base.astype(np.float32) * gain, 0, 255).astype(np.uint8)
            img = np.roll(img, 4 * i, axis=1)
            if flip:
                img = img[:, ::-1]
            Image.fromarray(img).save(tmp_path / label / f"{i}.png")
    return tmp_path


def test_astronaut_end_to_end(engines, workers, web_server, smoke_folder):
    with session_scope() as s:  # start with no active model
        s.execute(update(ModelVersion).where(ModelVersion.status == "active").values(status="retired"))

    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-SMOKE")
    upload = portal.upload(case_id, [("astronaut.jpg", _jpeg_with_exif(data.astronaut()))])
    assert upload.status_code == 201, upload.text
    image_id = upload.json()["images"][0]["id"]

    payload = portal.wait(case_id, timeout=120, settled=("awaiting_model", "rejected", "failed", "done"))
    assert payload["images"][0]["status"] == "awaiting_model"

    trained = run_cli(engines, "train", "--data", str(smoke_folder), "--width", "0.125", "--epochs", "1",
                      "--batch-size", "4", "--name", "smoke-model", "--activate")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "registered model version smoke-model" in trained.stderr

    payload = portal.wait(case_id, timeout=120)
    image = payload["images"][0]
    assert image["status"] == "done", image
    result = image["result"]
    assert result["model_version"]["name"] == "smoke-model"
    face = image["face"]
    assert len(face["landmarks"]) == 68 and face["rotation"] == 0
    assert 28 < face["measurements"]["canthal_index"] < 45 and face["quality"]["sharpness"] > 8
    report = portal.http.get(f"{web_server}/cases/{case_id}/report")
    assert report.status_code == 200 and "canthal index" in report.text
    assert [r["name"] for r in result["ranking"]] in (["variant_a", "variant_b"], ["variant_b", "variant_a"])
    assert sum(r["score"] for r in result["ranking"]) == pytest.approx(1.0, abs=1e-4)
    assert result["ranking"][0]["score"] >= result["ranking"][1]["score"]
    # The regional networks and the identity member (a head on the face encoder's descriptor, on by default).
    assert set(result["regions"]) == {"full_face", "upper_half", "middle_face", "lower_half", "identity"}
    assert set(result["ood"]) == {"distance", "percentile", "unusual"}

    with session_scope() as s:
        face = s.scalars(select(Face).where(Face.image_id == image_id)).one()
        x0, y0, x1, y1 = face.box
        assert 150 < x0 < 200 and 40 < y0 < 100 and 250 < x1 < 300 and 150 < y1 < 200  # her face
        assert len(face.landmarks) == 68 and face.rotation == 0
        assert face.detector == "mediapipe-blazeface-full" and len(face.weights["landmarker"]) == 64
        assert 28 < face.measurements["canthal_index"] < 45 and face.quality["interocular_px"] > 30
        crops = s.scalars(select(Crop).where(Crop.face_id == face.id)).all()
        # Every region is cut, whatever the active model uses: the grey crops, the identity encoder's face chip and
        # the encoder's cuts of the four regions; the model scores its own four regions and the identity member.
        assert sorted(c.region for c in crops) == sorted([*ALL_REGIONS, "face_chip",
                                                          *(cut_name(r) for r in DEFAULT_REGIONS)])
        assert s.scalar(select(func.count()).select_from(RegionScore).where(RegionScore.image_id == image_id)) == 5
        assert s.scalar(select(func.count()).select_from(Result).where(Result.image_id == image_id)) == 1
        from shared.models import Image as ImageRow

        stored_key, sha = s.get(ImageRow, image_id).object_key, s.get(ImageRow, image_id).sha256

    storage = get_storage()
    stored = Image.open(io.BytesIO(storage.get(stored_key)))
    assert stored.size == (512, 512)
    assert not stored.getexif(), "EXIF (GPS, make) must be gone from the stored photo"
    assert len({c.object_key for c in crops}) == 1  # one object holds all of the face's crops
    stored_crops = load_crops(storage, {c.region: c.object_key for c in crops}, [c.region for c in crops])
    assert all(stored_crops[r].shape == (100, 100) and stored_crops[r].dtype == np.uint8 for r in ALL_REGIONS)
    assert stored_crops["face_chip"].shape == (150, 150, 3)
    assert all(stored_crops[cut_name(r)].shape == (150, 150, 3) for r in DEFAULT_REGIONS)

    # The aligned face travels in the crops object; its PNG is made when someone first looks at it, not by the
    # workers, and holds the same pixels.
    in_bundle = aligned_face(storage, sha, face.aligned_key)
    assert in_bundle.shape == (CANVAS, CANVAS, 3) and in_bundle.dtype == np.uint8
    assert face.aligned_key == aligned_png_key(sha, aligned_digest(in_bundle)) and not storage.exists(face.aligned_key)
    shown = portal.http.get(f"{web_server}/images/{image_id}/aligned.png")
    assert shown.status_code == 200 and shown.headers["Content-Type"] == "image/png"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(shown.content)).convert("RGB")), in_bundle)
    assert storage.get(face.aligned_key) == shown.content  # stored on the first view, read on the next
    assert portal.http.get(f"{web_server}/images/{image_id}/aligned.png").content == shown.content


def test_an_aligned_face_stored_as_its_own_png_still_shows(engines):
    """Faces aligned before the crops object held the aligned face have their PNG: it is read, not made again;
    with neither stored there is nothing to show (the portal and the API answer 404)."""
    storage = get_storage()
    sha = "ab" * 32
    rgb = np.random.default_rng(0).integers(0, 256, (CANVAS, CANVAS, 3), dtype=np.uint8)
    png = encode_png(rgb)
    store_crops(storage, sha, {"full_face": np.zeros((100, 100), np.uint8)})  # no aligned face inside
    storage.put(aligned_key(sha), png, "image/png")
    try:
        assert np.array_equal(aligned_face(storage, sha, aligned_key(sha)), rgb)
        assert aligned_face_png(storage, sha, aligned_key(sha)) == png
        storage.delete(aligned_key(sha))
        assert aligned_face_png(storage, sha, aligned_key(sha)) is None
        assert not storage.exists(aligned_key(sha))
        # A row that names another alignment's face than the crops object holds (the photo is being aligned again)
        # shows nothing rather than the other face; the one the object holds is made and shown.
        store_crops(storage, sha, {"full_face": np.zeros((100, 100), np.uint8)}, rgb)
        assert aligned_face_png(storage, sha, aligned_png_key(sha, aligned_digest(rgb[::-1]))) is None
        assert aligned_face_png(storage, sha, aligned_png_key(sha, aligned_digest(rgb))) == png
        with pytest.raises(ValueError, match="aligned face"):
            store_crops(storage, sha, {ALIGNED_FACE: rgb})
    finally:
        for key in [aligned_key(sha), *storage.list(crops_prefix(sha))]:
            storage.delete(key)


def test_turned_face_is_scored_and_flagged_on_the_api_and_the_report(engines, workers, web_server):
    """A face turned 40 degrees used to be refused ("turned too far to the side"); now it goes on, flagged."""
    from shared.ml.preprocess.pipeline import Preprocessor
    from tests.posed_faces import PosedFace

    pre = Preprocessor()
    photo = data.astronaut()
    face = PosedFace(photo, pre.mesh.mesh(photo, pre.detect(photo).face.box))
    pre.close()
    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-TURNED")
    blobs = []
    for name, yaw in (("frontal.png", 0), ("turned.png", 40)):
        buf = io.BytesIO()
        Image.fromarray(face.draw(yaw, 0, 0)).save(buf, format="PNG")
        blobs.append((name, buf.getvalue()))
    assert portal.upload(case_id, blobs).status_code == 201
    payload = portal.wait(case_id, timeout=120, settled=("awaiting_model", "rejected", "failed", "done"))
    faces = sorted((i for i in payload["images"] if i["face"]), key=lambda i: len(i["face"]["flags"]))
    assert [len(i["face"]["flags"]) for i in faces] == [0, 1], payload["images"]
    turned = faces[1]
    assert turned["status"] != "rejected" and turned["face"]["flags"] == ["turned face: less reliable"]
    assert 30 < turned["face"]["quality"]["yaw_degrees"] <= 60 and turned["face"]["quality"]["flags"] == ["turned"]
    report = portal.http.get(f"{web_server}/cases/{case_id}/report")
    assert report.status_code == 200 and "Turned face: less reliable." in report.text

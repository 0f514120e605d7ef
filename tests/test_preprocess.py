"""Preprocessing on real photos: detection, rotation, the quality gate, alignment, regions, measurements.

The same tests run for every detector whose weights are here: BlazeFace (bundled with
mediapipe) always, and RetinaFace MobileNet-0.25 from ``../shared/data/weights``. The
production ResNet-50 and FAN files are not on these machines: their loaders are tested on
files saved from randomly initialised networks in the torch hub cache layout.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image as PILImage
from skimage import data

from shared.cli import main as cli
from shared.ml.formats.weights import WEIGHTS_BY_KEY, WeightsMissing
from shared.ml.preprocess.alignment import TEMPLATE
from shared.ml.preprocess.imaging import ImageRejected, decode_upload
from shared.ml.preprocess.landmarks import five_points
from shared.ml.preprocess.measurements import measure
from shared.ml.preprocess.pipeline import NO_FACE, Preprocessed, Preprocessor, check_backends, resolve_backends
from shared.ml.preprocess.pose import head_pose
from shared.ml.preprocess.quality import FACE_TOO_SMALL, IMAGE_TOO_SMALL, TOO_BLURRY, TOO_DARK
from shared.ml.preprocess.regions import ALL_REGIONS, CROP_SIZE, DEFAULT_REGIONS, REGIONS
from tests.conftest import SHARED_DATA

FACES = SHARED_DATA / "faces"
WEIGHTS = SHARED_DATA / "weights"
# Mean absolute grey-level difference (0-255) allowed between the crops of the same photo
# stored upright, turned by 90 degrees, or turned with an EXIF orientation tag. The turned
# photo's landmarks are found on different pixels, so the alignment differs by a fraction of
# a pixel; measured differences are 2-4 grey levels.
ROTATION_CROP_BOUND = 6.0

needs_faces = pytest.mark.skipif(not FACES.is_dir(), reason=f"real photos not found at {FACES}")


def _backends() -> list:
    params = [pytest.param("mediapipe", id="blazeface")]
    mark = pytest.mark.skipif(not (WEIGHTS / "retinaface_mobilenet0.25.pth").is_file(),
                              reason=f"RetinaFace MobileNet-0.25 weights not found in {WEIGHTS}")
    params.append(pytest.param("retinaface", id="retinaface-mobilenet", marks=mark))
    return params


@pytest.fixture(scope="module", params=_backends())
def pre(request):
    with pytest.MonkeyPatch.context() as mp:
        # Only the shared folder: an H100 image with production weights in the hub cache must not change the test.
        mp.setenv("GESTALT_WEIGHTS_DIR", str(WEIGHTS))
        mp.setenv("TORCH_HOME", "/nonexistent-torch-home")
        p = Preprocessor(regions=ALL_REGIONS, detector=request.param, landmarker="mediapipe")
        yield p
        p.close()


def _load(path: Path) -> np.ndarray:
    return decode_upload(path.read_bytes(), max_bytes=50 << 20, max_pixels=4e7, min_side=32).rgb


def _jpeg(rgb: np.ndarray, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    img = PILImage.fromarray(rgb)
    exif = img.getexif()
    if orientation:
        exif[0x0112] = orientation
    img.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_astronaut_is_found_aligned_cropped_and_measured(pre):
    result = pre.run(data.astronaut())
    x0, y0, x1, y1 = result.face.box
    assert 160 < x0 < 200 and 250 < x1 < 300 and result.face.score > 0.5 and result.detection.rotation == 0
    assert result.aligned.landmarks.shape == (68, 2)
    eyes = result.aligned.alignment.apply(five_points(result.aligned.landmarks))[:2]
    assert np.abs(eyes - TEMPLATE[:2]).max() < 3  # canvas pixels
    assert set(result.aligned.crops) == set(REGIONS) == set(ALL_REGIONS)
    for crop in result.aligned.crops.values():
        assert crop.shape == (CROP_SIZE, CROP_SIZE) and crop.dtype == np.uint8 and crop.std() > 10
    m = result.aligned.measurements
    assert 28 < m["canthal_index"] < 45 and 0.3 < m["interpupillary_distance"] < 0.6
    assert -15 < m["palpebral_fissure_slant"] < 15 and 0.3 < m["mouth_width"] < 0.6
    assert result.aligned.quality["interocular_px"] > 30 and abs(result.aligned.quality["yaw_degrees"]) < 15
    provenance = pre.provenance
    assert len(provenance["detector_sha256"]) == 64 and len(provenance["landmarker_sha256"]) == 64


def test_photo_without_face_is_rejected_with_reason(pre):
    with pytest.raises(ImageRejected) as err:
        pre.run(data.coffee())
    assert err.value.reason == NO_FACE


@needs_faces
def test_detection_rate_on_single_face_photos(pre):
    photos = [p for p in sorted((FACES / "people").glob("*.jpg")) if p.stem not in ("couple", "selfie-many-people")]
    photos += sorted((FACES / "orl").glob("s*/1.pgm"))
    found = 0
    for path in photos:
        try:
            pre.detect(_load(path))
            found += 1
        except ImageRejected:
            pass
    assert len(photos) > 90
    assert found / len(photos) >= 0.95, f"{found}/{len(photos)}"


@needs_faces
@pytest.mark.parametrize("name", ["couple.jpg", "selfie-many-people.jpg"])
def test_main_face_of_a_group_photo_is_the_largest(pre, name):
    rgb = _load(FACES / "people" / name)
    detection = pre.detect(rgb)
    confident = [f for f in pre.detector.detect(rgb) if f.score >= pre.min_confidence]
    assert detection.faces_found == len(confident) >= 2
    assert detection.face.area >= 0.97 * max(f.area for f in confident)


def test_main_face_is_the_largest_on_a_composed_photo(pre):
    big = data.astronaut()
    canvas = np.full((700, 900, 3), 200, np.uint8)
    canvas[100:612, 300:812] = big
    canvas[20:191, 20:191] = big[::3, ::3]
    detection = pre.detect(canvas)
    assert detection.face.box[0] > 300  # the big face, not the small one


@needs_faces
def test_eye_centres_land_on_the_template(pre):
    """Within 3 px on the 100 px crop scale (6 px on the 200 px canvas), for faces within 30 degrees of frontal."""
    photos = sorted((FACES / "people").glob("*.jpg"))[:30] + sorted((FACES / "orl").glob("s*/[15].pgm"))
    errors = []
    for path in photos:
        try:
            result = pre.run(_load(path))
        except ImageRejected:
            continue
        if abs(result.aligned.quality["yaw_degrees"]) > 30:
            continue
        eyes = result.aligned.alignment.apply(five_points(result.aligned.landmarks))[:2]
        errors.append(np.abs(eyes - TEMPLATE[:2]).max() / 2)
    assert len(errors) > 0.8 * len(photos)
    assert max(errors) < 3.0, sorted(errors)[-5:]


def test_turned_and_exif_rotated_photos_give_the_same_crops(pre):
    upright = data.astronaut()
    reference = pre.run(_load_bytes(_jpeg(upright)))
    # Stored turned 90 degrees counter-clockwise; the EXIF tag (6: "rotate 90 clockwise to show") puts it upright.
    exif_rotated = pre.run(_load_bytes(_jpeg(np.ascontiguousarray(np.rot90(upright, 1)), orientation=6)))
    assert exif_rotated.detection.rotation == 0
    for k in (1, 3):
        turned = pre.run(_load_bytes(_jpeg(np.ascontiguousarray(np.rot90(upright, k)))))
        assert abs(abs(turned.detection.rotation) - 90) < 25
        for other in (turned, exif_rotated):
            for region in DEFAULT_REGIONS:
                diff = np.abs(other.aligned.crops[region].astype(float) - reference.aligned.crops[region]).mean()
                assert diff < ROTATION_CROP_BOUND, (k, region, diff)
    upside_down = pre.run(_load_bytes(_jpeg(np.ascontiguousarray(np.rot90(upright, 2)))))
    assert abs(abs(upside_down.detection.rotation) - 180) < 25
    assert np.abs(upside_down.aligned.crops["full_face"].astype(float)
                  - reference.aligned.crops["full_face"]).mean() < ROTATION_CROP_BOUND


def _load_bytes(blob: bytes) -> np.ndarray:
    return decode_upload(blob, max_bytes=50 << 20, max_pixels=4e7, min_side=32).rgb


def test_tilted_face_is_levelled(pre):
    import cv2

    upright = data.astronaut()
    m = cv2.getRotationMatrix2D((256, 256), 35, 1.0)
    tilted = cv2.warpAffine(upright, m, (512, 512), borderMode=cv2.BORDER_REFLECT)
    result = pre.run(tilted)
    # Turned 35 degrees counter-clockwise: levelled by turning it about as far back.
    assert -50 < result.detection.rotation < -20
    assert abs(abs(result.aligned.alignment.rotation_degrees) - 35) < 6


def test_quality_gate_names_the_problem(pre):
    import cv2

    photo = data.astronaut()
    with pytest.raises(ImageRejected) as err:
        pre.run(photo[:60, :60])
    assert err.value.reason == IMAGE_TOO_SMALL
    with pytest.raises(ImageRejected) as err:
        pre.run((photo * 0.12).astype(np.uint8))
    assert err.value.reason == TOO_DARK
    with pytest.raises(ImageRejected) as err:
        pre.run(cv2.GaussianBlur(photo, (0, 0), 3))
    assert err.value.reason in (TOO_BLURRY, "the face could not be measured (landmarks not found); "
                                             "upload a sharper, frontal photo")
    with pytest.raises(ImageRejected) as err:
        pre.run(cv2.GaussianBlur(photo, (0, 0), 2.2))
    assert err.value.reason == TOO_BLURRY
    # A face whose eyes are about 12 px apart, on a large photo: too small (or, for some detectors, not found).
    small = np.full((900, 900, 3), 120, np.uint8)
    small[400:540, 400:540] = cv2.resize(photo, (140, 140), interpolation=cv2.INTER_AREA)
    with pytest.raises(ImageRejected) as err:
        pre.run(small)
    assert err.value.reason == NO_FACE or err.value.reason.startswith(FACE_TOO_SMALL.split("{")[0])


def test_pose_and_measurements_on_known_geometry():
    base = Preprocessor().run(data.astronaut()).aligned
    canvas = base.alignment.apply(base.landmarks)
    on_canvas, in_photo = head_pose(canvas), head_pose(base.landmarks)
    assert abs(on_canvas.yaw) < 10 and abs(on_canvas.yaw - in_photo.yaw) < 0.5
    assert abs(on_canvas.pitch - in_photo.pitch) < 0.5
    wide = canvas.copy()
    wide[36:42, 0] -= 8
    wide[42:48, 0] += 8
    assert measure(wide)["canthal_index"] > measure(canvas)["canthal_index"] + 5
    down = canvas.copy()
    down[36, 1] += 6
    down[45, 1] += 6
    assert measure(down)["palpebral_fissure_slant"] < measure(canvas)["palpebral_fissure_slant"] - 5
    long_philtrum = canvas.copy()
    long_philtrum[48:68, 1] += 6
    assert measure(long_philtrum)["philtrum_length"] > measure(canvas)["philtrum_length"] * 1.3


def test_batch_gives_the_same_results_as_single_photos(pre):
    photos = [data.astronaut(), data.coffee(), np.ascontiguousarray(np.rot90(data.astronaut(), 1))]
    batch = pre.run_batch(photos)
    assert isinstance(batch[0], Preprocessed) and isinstance(batch[2], Preprocessed)
    assert isinstance(batch[1], ImageRejected) and batch[1].reason == NO_FACE
    single = pre.run(photos[0])
    np.testing.assert_allclose(batch[0].aligned.landmarks, single.aligned.landmarks, atol=0.5)


def test_cli_writes_aligned_face_crops_overlay_and_json(tmp_path):
    photo = tmp_path / "astronaut.jpg"
    photo.write_bytes(_jpeg(data.astronaut()))
    coffee = tmp_path / "coffee.jpg"
    coffee.write_bytes(_jpeg(data.coffee()))
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["preprocess", str(photo), str(coffee), "--out", str(out),
                                      "--detector", "mediapipe", "--landmarker", "mediapipe"])
    assert result.exit_code == 0, result.output
    assert "1 aligned, 1 rejected" in result.output
    record = json.loads((out / "astronaut" / "result.json").read_text())
    assert len(record["landmarks"]) == 68 and record["rotation"] == 0
    assert set(record["measurements"]) >= {"canthal_index", "palpebral_fissure_slant", "philtrum_length"}
    assert record["detector"] == "mediapipe-blazeface-full" and len(record["landmarker_sha256"]) == 64
    for name in ("aligned.png", "landmarks.png", *(f"crops/{r}.png" for r in ALL_REGIONS)):
        assert (out / "astronaut" / name).stat().st_size > 500
    assert json.loads((out / "coffee" / "result.json").read_text())["rejected"] == NO_FACE


# --- production loaders, on randomly initialised weights in the torch hub cache layout ---------------

@pytest.fixture
def random_hub(tmp_path, monkeypatch):
    from face_alignment.models import FAN
    from retinaface.network import RetinaFace

    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(FAN(4).state_dict(), checkpoints / WEIGHTS_BY_KEY["fan"].filename)
    net = RetinaFace(name="Resnet50", pretrained=False, return_layers={"layer2": 1, "layer3": 2, "layer4": 3},
                     in_channels=256, out_channels=256)
    torch.save(net.state_dict(), checkpoints / WEIGHTS_BY_KEY["retinaface_resnet50"].filename)
    monkeypatch.delenv("GESTALT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return checkpoints


def test_production_loaders_read_the_hub_cache(random_hub):
    assert resolve_backends("auto", "auto") == ("retinaface", "fan")
    # The manifest's hashes protect production: random weights are refused, in one line.
    with pytest.raises(WeightsMissing) as err:
        Preprocessor(detector="retinaface", landmarker="mediapipe")
    assert "sha256" in str(err.value) and "\n" not in str(err.value)
    pre = Preprocessor(detector="retinaface", landmarker="fan", verify_weights=False)
    try:
        assert pre.detector_name == "retinaface-resnet50" and pre.landmarker_name == "fan-2d-68"
        photos = [data.astronaut(), data.astronaut()[::2, ::2].copy()]
        faces = pre.detector.detect_batch(photos)
        assert len(faces) == 2 and all(isinstance(f, list) for f in faces)
        marks = pre.mesh.landmarks_batch(photos, [(170, 60, 280, 180), (85, 30, 140, 90)])
        assert [m.shape for m in marks] == [(68, 2), (68, 2)]
        # Random heat maps still decode to points inside each crop around the box.
        assert (marks[0][:, 0] > 0).all() and (marks[0][:, 0] < 512).all()
        assert len(pre.provenance["detector_sha256"]) == 64
    finally:
        pre.close()


def test_missing_production_weights_are_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.delenv("GESTALT_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert resolve_backends("auto", "auto") == ("mediapipe", "mediapipe")
    for kwargs in ({"detector": "retinaface"}, {"landmarker": "fan"}):
        with pytest.raises(WeightsMissing) as err:
            Preprocessor(**kwargs)
        message = str(err.value)
        assert "not found in" in message and "gestalt weights fetch" in message and "\n" not in message

    settings = SimpleNamespace(detector_backend="retinaface", landmark_backend="auto", weights_verify=True)
    with pytest.raises(WeightsMissing):
        check_backends(settings)
    settings.detector_backend = "auto"
    assert check_backends(settings) == "detector=mediapipe landmarks=mediapipe"
    result = CliRunner().invoke(cli, ["preprocess", __file__, "--out", str(tmp_path / "o"), "--detector", "retinaface"])
    assert result.exit_code != 0 and "Error: retinaface-resnet50" in result.output
    assert "Traceback" not in result.output


def _close_up(rgb: np.ndarray, landmarks: np.ndarray, fill: float = 0.9) -> np.ndarray:
    """A square crop in which the face (jaw to jaw, chin to the estimated hairline) fills ``fill`` of the side."""
    brow, chin = landmarks[17:27, 1].min(), landmarks[8, 1]
    x0, x1, y0 = landmarks[:17, 0].min(), landmarks[:17, 0].max(), brow - 0.5 * (chin - brow)
    side = int(min(max(x1 - x0, chin - y0) / fill, *rgb.shape[:2]))
    sx = int(np.clip((x0 + x1 - side) / 2, 0, rgb.shape[1] - side))
    sy = int(np.clip((y0 + chin - side) / 2, 0, rgb.shape[0] - side))
    import cv2

    return cv2.resize(rgb[sy:sy + side, sx:sx + side], (384, 384), interpolation=cv2.INTER_CUBIC)


@needs_faces
def test_close_ups_padded_and_turned_photos_are_found_and_aligned(pre):
    """A bounded subset of ``bench/face_variants.py``: faces that fill the frame, on a wide margin, lying on
    either side."""
    photos = []
    for name in ("img1.jpg", "img17.jpg", "img30.jpg"):
        im = PILImage.open(FACES / "people" / name).convert("RGB")
        im.thumbnail((800, 800))
        photos.append(np.asarray(im))
    photos += [_load(FACES / "orl" / f"s{i}" / "1.pgm") for i in (2, 9, 27)]
    failures, tried = [], 0
    for i, rgb in enumerate(photos):
        reference = pre.run(rgb).aligned.landmarks
        margin = max(rgb.shape[:2]) // 4
        variants = {"close-up": _close_up(rgb, reference),
                    "padded": np.pad(rgb, ((margin, margin), (margin, margin), (0, 0)), constant_values=128)}
        for kind, image in variants.items():
            for k in (0, 1, 3):
                tried += 1
                try:
                    pre.run(np.ascontiguousarray(np.rot90(image, k)))
                except ImageRejected as exc:
                    failures.append((i, kind, 90 * k, exc.reason))
    assert len(failures) <= tried // 20, failures

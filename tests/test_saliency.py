"""Grad-CAM heatmaps: meaningful on trained weights, projected onto the right boxes, served to the right people."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import requests
import torch
from skimage import data
from sqlalchemy import select

from shared.ml.explain import saliency
from shared.ml.members.casia import casia_only
from shared.ml.nets.ensemble import RegionalEnsemble
from shared.ml.nets.ensemble import predict_regions as predict
from shared.ml.preprocess.regions import REGIONS

MARK = 18  # side of the synthetic mark, in crop pixels
AREA = (slice(0, 50), slice(0, 50))  # the known area of the crop where the mark goes: its top-left quarter


def _marked_crops(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list]:
    """Textured backgrounds; those of class 1 carry a bright square somewhere in ``AREA``.

    Returns crops, labels and each crop's mark box (None for class 0).
    """
    labels = rng.integers(0, 2, n)
    smooth = cv2.GaussianBlur(rng.normal(0, 1, (n, 100, 100)).astype(np.float32).transpose(1, 2, 0), (0, 0), 3)
    crops = np.clip(110 + 40 * smooth.transpose(2, 0, 1) / smooth.std() + rng.normal(0, 8, (n, 100, 100)), 0, 255)
    boxes = []
    for i, label in enumerate(labels):
        if not label:
            boxes.append(None)
            continue
        y = rng.integers(AREA[0].start + 2, AREA[0].stop - MARK - 2)
        x = rng.integers(AREA[1].start + 2, AREA[1].stop - MARK - 2)
        crops[i, y:y + MARK, x:x + MARK] = 245
        boxes.append((slice(y, y + MARK), slice(x, x + MARK)))
    return crops.astype(np.uint8), labels, boxes


@pytest.fixture(scope="module")
def trained():
    """Two region networks trained until they read the mark: real weights, a real signal."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    regions = ("full_face", "eyes")
    model = RegionalEnsemble(regions, num_classes=2, width=0.125)
    crops, labels, _ = _marked_crops(160, rng)
    x = torch.as_tensor(np.repeat(crops[:, None], len(regions), 1))
    y = torch.as_tensor(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(4):
        for idx in torch.randperm(len(x)).split(16):
            xb = x[idx].float().unsqueeze(2) / 127.5 - 1
            loss = torch.nn.functional.cross_entropy(model(xb).flatten(0, 1), y[idx].repeat_interleave(len(regions)))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    test_crops, test_labels, boxes = _marked_crops(60, np.random.default_rng(1))
    accuracy = (predict(model, np.repeat(test_crops[:, None], len(regions), 1)).aggregate.argmax(1)
                == test_labels).mean()
    assert accuracy >= 0.9, f"the tiny model did not learn the mark (accuracy {accuracy:.2f})"
    marked = test_labels == 1
    return model, test_crops[marked], [b for b in boxes if b is not None]


def _mass_in(heat: np.ndarray, ys: slice, xs: slice) -> float:
    total = heat.sum()
    return float(heat[ys, xs].sum() / total) if total > 0 else 0.0


def _grown(box: tuple[slice, slice], margin: int = 6) -> tuple[slice, slice]:
    ys, xs = box
    return slice(max(0, ys.start - margin), ys.stop + margin), slice(max(0, xs.start - margin), xs.stop + margin)


def test_grad_cam_concentrates_on_the_mark(trained):
    model, crops, boxes = trained
    in_area, on_mark = [], []
    for crop, box in zip(crops[:16], boxes[:16], strict=True):
        maps = saliency.region_maps(model, np.stack([crop, crop]), 1)
        assert set(maps) == {"full_face", "eyes"}
        for m in maps.values():
            assert m.shape == (100, 100) and m.min() >= 0 and m.max() == pytest.approx(1.0)
            in_area.append(_mass_in(m, *AREA))
            on_mark.append(_mass_in(m, *_grown(box)))
    # The area is a quarter of the crop, the mark and its margin about a tenth: a map blind to the mark
    # would put about 25% and 10% of its mass there (the last conv's 7x7 grid blurs it over ~14 px cells).
    assert np.median(in_area) > 0.5, in_area
    assert np.median(on_mark) > 0.2, on_mark


def test_untrained_weights_do_not_find_the_mark(trained):
    """The same measure on random weights stays near chance: the test above can fail."""
    _, crops, boxes = trained
    on_mark = []
    for seed in range(3):
        torch.manual_seed(seed)
        random_model = RegionalEnsemble(("full_face",), num_classes=2, width=0.125).eval()
        for crop, box in zip(crops[:8], boxes[:8], strict=True):
            m = saliency.region_maps(random_model, crop[None], 1)["full_face"]
            if m.sum() > 0:  # a random net may have no positive evidence at all
                on_mark.append(_mass_in(m, *_grown(box)))
    assert len(on_mark) >= 8 and np.median(on_mark) < 0.2, on_mark


def test_projection_onto_the_aligned_canvas(trained):
    model, crops, _ = trained
    maps = saliency.region_maps(model, np.stack([crops[0], crops[0]]), 1)
    canvas = saliency.to_canvas(maps["eyes"], "eyes")
    x0, y0, x1, y1 = REGIONS["eyes"]
    assert canvas.shape == (200, 200)
    assert canvas[:y0].sum() == 0 and canvas[y1:].sum() == 0 and canvas[:, :x0].sum() == 0
    assert canvas[y0:y1, x0:x1].max() == pytest.approx(1.0, abs=0.02)
    # The crop's quadrant lands in the same quadrant of the box on the canvas.
    ys, xs = AREA
    box_h, box_w = y1 - y0, x1 - x0
    sub = canvas[y0 + ys.start * box_h // 100:y0 + ys.stop * box_h // 100,
                 x0 + xs.start * box_w // 100:x0 + xs.stop * box_w // 100]
    assert sub.sum() / canvas.sum() == pytest.approx(_mass_in(maps["eyes"], ys, xs), abs=0.08)
    combined = saliency.combine(maps)
    assert combined.max() == pytest.approx(1.0) and combined[:5].max() < 0.01  # above every box


def test_overlay_png_draws_over_the_face(trained):
    model, crops, _ = trained
    face = cv2.resize(data.astronaut()[30:230, 150:350], (200, 200))
    for region in ("all", "eyes"):
        png = saliency.heatmap_png(model, np.stack([crops[0], crops[0]]), face, 1, region)
        out = cv2.cvtColor(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        assert out.shape == (200, 200, 3) and not np.array_equal(out, face)
    x0, y0, x1, y1 = REGIONS["eyes"]
    assert np.array_equal(out[:y0 - 1], face[:y0 - 1])  # outside the region's box the face is untouched
    with pytest.raises(ValueError):
        saliency.heatmap_png(model, np.stack([crops[0], crops[0]]), face, 0, "mouth")
    with pytest.raises(ValueError):
        saliency.region_maps(model, np.stack([crops[0], crops[0]]), 2)


@pytest.mark.e2e
def test_heatmap_route_access_cache_and_audit(engines, workers, web_server):
    from shared.db import session_scope
    from shared.modelops import registry
    from shared.models import AuditLog, Image, ModelVersion
    from shared.storage import get_storage, heatmap_key
    from tests.conftest import Portal, new_user

    torch.manual_seed(0)
    model = RegionalEnsemble(("full_face", "upper_half", "middle_face", "lower_half"), 2, width=0.125).eval()
    with session_scope() as s:
        version = registry.register_model(s, get_storage(), casia_only(model, ["heat-a", "heat-b"]), {},
                                          name="heatmap-model")
        registry.activate(s, version)
        checkpoint = version.checkpoint_sha256
    owner = Portal(web_server, new_user())
    case_id = owner.create_case("PT-HEAT")
    photo = data.astronaut().copy()
    photo[0, 0] = (7, 8, 9)  # a photo no other test uploads, so deleting the case removes its objects
    ok, buf = cv2.imencode(".png", cv2.cvtColor(photo, cv2.COLOR_RGB2BGR))
    image_id = owner.upload(case_id, [("a.png", buf.tobytes())]).json()["images"][0]["id"]
    image = owner.wait(case_id, timeout=180)["images"][0]
    assert image["status"] == "done", image
    url = f"{web_server}/cases/{case_id}/images/{image_id}/heatmap.png"

    r = owner.http.get(url, params={"syndrome": "heat-b", "region": "all"})
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/png", r.text[:300]
    assert cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR).shape == (200, 200, 3)
    with session_scope() as s:
        sha = s.get(Image, image_id).sha256
        syndrome_id = s.scalars(select(ModelVersion).where(ModelVersion.name == "heatmap-model")).one().classes[1][
            "syndrome_id"]
    assert get_storage().get(heatmap_key(sha, checkpoint, syndrome_id, "all")) == r.content  # cached
    assert owner.http.get(url, params={"syndrome": "1", "region": "all"}).content == r.content  # by index
    region = owner.http.get(url, params={"syndrome": "1", "region": "upper_half"})
    assert region.status_code == 200 and region.content != r.content
    assert owner.http.get(url, params={"syndrome": "nope"}).status_code == 400
    assert owner.http.get(url, params={"syndrome": "0", "region": "ears"}).status_code == 400
    assert owner.http.get(f"{web_server}/cases/{case_id}/images/{image_id + 10_000}/heatmap.png",
                          params={"syndrome": "0"}).status_code == 404

    other = Portal(web_server, new_user())
    assert other.http.get(url, params={"syndrome": "0"}).status_code == 404
    assert requests.get(url, params={"syndrome": "0"}, allow_redirects=False).status_code == 302  # login first
    admin = Portal(web_server, new_user("admin"))
    assert admin.http.get(url, params={"syndrome": "heat-b"}).content == r.content
    api = admin.http.get(f"{web_server}/api/v1/cases/{case_id}/images/{image_id}/heatmap.png",
                         params={"syndrome": "heat-b"})
    assert api.status_code == 200 and api.content == r.content
    assert other.http.get(f"{web_server}/api/v1/cases/{case_id}/images/{image_id}/heatmap.png",
                          params={"syndrome": "0"}).json()["error"]

    with session_scope() as s:
        rows = s.scalars(select(AuditLog).where(AuditLog.action == "heatmap_view",
                                                AuditLog.target_id == str(image_id)).order_by(AuditLog.id)).all()
        assert len(rows) == 5
        assert [row.detail["cached"] for row in rows[:2]] == [False, True]
        assert {row.detail["via"] for row in rows} == {"portal", "api"}

    # Deleting the case removes its overlays and crops with the photo.
    from shared.storage import crops_key, crops_prefix, heatmap_prefix

    assert get_storage().list(heatmap_prefix(sha)) and crops_key(sha) in get_storage().list(crops_prefix(sha))
    # A crop that no row points at any more (one PNG per crop, from before a re-alignment) goes with them.
    stray = get_storage().put(f"{crops_prefix(sha)}full_face.png", b"\x89PNG stale crop", "image/png")
    token = owner.csrf(f"/cases/{case_id}")
    deleted = owner.http.post(f"{web_server}/cases/{case_id}/delete", data={"csrf_token": token},
                              allow_redirects=False)
    assert deleted.status_code == 303
    assert get_storage().list(crops_prefix(sha)) == [] and not get_storage().exists(stray)

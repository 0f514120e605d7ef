"""The infer stage scores the photos waiting behind it in one forward pass, and a crash there loses nothing."""
from __future__ import annotations

import io
import time

import numpy as np
import torch
from PIL import Image
from skimage import data
from sqlalchemy import select, update

from shared import photos
from shared.db import session_scope
from shared.ml.members.casia import casia_only
from shared.ml.nets.ensemble import RegionalEnsemble, predict_regions
from shared.ml.preprocess.imaging import encode_png
from shared.modelops import registry
from shared.modelops.crops import crop_keys, load_crops, region_stack
from shared.models import Face, ModelVersion, Result
from shared.models import Image as ImageRow
from shared.storage import get_storage
from tests.conftest import Portal, new_user, wait_idle
from worker import pipeline


def _photo(seed: int) -> bytes:
    rgb = data.astronaut().copy()
    rgb[0, :3] = seed  # distinct photos
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_waiting_photos_are_scored_in_one_batch(engines, workers, web_server):
    with session_scope() as s:  # no active model: the photos stop at awaiting_model with their crops
        s.execute(update(ModelVersion).where(ModelVersion.status == "active").values(status="retired"))
    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-BATCH")
    portal.upload(case_id, [(f"{i}.png", _photo(40 + i)) for i in range(4)])
    payload = portal.wait(case_id, timeout=180, settled=("awaiting_model", "rejected", "failed", "done"))
    ids = sorted(i["id"] for i in payload["images"])
    assert [i["status"] for i in payload["images"]] == ["awaiting_model"] * 4
    wait_idle()

    torch.manual_seed(0)
    model = RegionalEnsemble(("full_face", "upper_half", "middle_face", "lower_half"), 3, width=0.125).eval()
    with session_scope() as s:
        # Waiting for scoring, as the sweep leaves them when a model appears (no messages are sent here).
        for image in s.scalars(select(ImageRow).where(ImageRow.id.in_(ids))):
            photos.wake(image)
        version = registry.register_model(s, get_storage(), casia_only(model, ["b-one", "b-two", "b-three"]), {},
                                          name="batch-model")
        registry.activate(s, version)
        version_id = version.id

    # One infer call, in this process, for the first photo: the other three ride along.
    assert pipeline.infer(ids[0]) == ids[0]
    with session_scope() as s:
        rows = {i.id: i for i in s.scalars(select(ImageRow).where(ImageRow.id.in_(ids)))}
        assert {i.status for i in rows.values()} == {"done"}
        assert [rows[i].stage_times.get("batched_with") for i in ids] == [None, ids[0], ids[0], ids[0]]
        results = {r.image_id: r.scores for r in s.scalars(
            select(Result).where(Result.image_id.in_(ids), Result.model_version_id == version_id))}
    assert set(results) == set(ids)
    # Scores in a batch equal the scores of the photo alone.
    with session_scope() as s:
        keys = crop_keys(s, [ids[2]])[ids[2]]
    assert len(set(keys.values())) == 1  # all of a face's crops are one object
    alone = predict_regions(model, region_stack(get_storage(), keys, model.regions)[None])
    np.testing.assert_allclose(results[ids[2]], alone.aggregate[0], atol=2e-4)

    # A photo's own message, arriving after the batch scored it, does nothing.
    assert pipeline.infer(ids[1]) is None

    # A face aligned before the crops were bundled (one PNG per crop) is scored the same.
    _store_as_png_crops(ids[3])
    with session_scope() as s:
        photos.rescore(s.get(ImageRow, ids[3]))
    assert pipeline.infer(ids[3]) == ids[3]
    with session_scope() as s:
        assert len(set(crop_keys(s, [ids[3]])[ids[3]].values())) > 1
        rescored = s.scalars(select(Result.scores).where(Result.image_id == ids[3],
                                                         Result.model_version_id == version_id)).one()
    np.testing.assert_allclose(rescored, results[ids[3]], atol=1e-6)


def _store_as_png_crops(image_id: int) -> None:
    """Store a photo's crops as faces aligned before the crops were bundled have them: one PNG per crop."""
    storage = get_storage()
    with session_scope() as s:
        sha = s.get(ImageRow, image_id).sha256
        face = s.scalars(select(Face).where(Face.image_id == image_id)).one()
        crops = load_crops(storage, {c.region: c.object_key for c in face.crops}, [c.region for c in face.crops])
        for c in face.crops:
            c.object_key = storage.put(f"crops/{sha[:2]}/{sha}/{c.region}.png", encode_png(crops[c.region]),
                                       "image/png")



def test_a_claimed_photo_met_while_realigning_waits_and_is_scored(engines, workers, web_server):
    """Scoring finds a photo's crops gone and aligns it again; another worker's batch holds it. The infer task
    sends the alignment and the scoring again after the wait (never a failure, never a spent retry), and the
    photo is scored once that batch's lease has run out."""
    from shared.config import get_settings
    from shared.dispatch import enqueue_scoring
    from shared.models import Crop

    with session_scope() as s:
        s.execute(update(ModelVersion).where(ModelVersion.status == "active").values(status="retired"))
    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-REALIGN")
    portal.upload(case_id, [("0.png", _photo(77))])
    (image_id,) = [i["id"] for i in portal.wait(case_id, timeout=180, settled=("awaiting_model",))["images"]]
    wait_idle()
    torch.manual_seed(0)
    model = RegionalEnsemble(("full_face", "upper_half", "middle_face", "lower_half"), 3, width=0.125).eval()
    lease = get_settings().claim_lease_seconds
    with session_scope() as s:
        image = s.get(ImageRow, image_id)
        face = s.scalars(select(Face).where(Face.image_id == image_id)).one()
        s.execute(Crop.__table__.delete().where(Crop.face_id == face.id))  # the crops are gone
        photos.wake(image)  # waiting for scoring, as the sweep leaves it when a model appears
        held_until = time.time() + 4  # another worker's batch holds the photo for four more seconds
        photos.stamp(image, claimed_at=held_until - lease, claimed_by="other@elsewhere:1")
        version = registry.register_model(s, get_storage(), casia_only(model, ["r-one", "r-two", "r-three"]), {},
                                          name="realign-model")
        registry.activate(s, version)
    enqueue_scoring(image_id)
    payload = portal.wait(case_id, timeout=120, settled=("done", "failed", "rejected"))
    wait_idle()
    with session_scope() as s:
        image = s.get(ImageRow, image_id)
        assert image.status == "done", image.reason
        assert s.scalar(select(Result.id).where(Result.image_id == image_id, Result.model_version_id == version.id))
        assert image.stage_times["align_start"] >= held_until  # aligned again once the other batch's lease ran out
        assert "retries" not in image.stage_times and "failed" not in image.stage_times
    assert payload["images"][0]["status"] == "done"

"""The infer stage scores the photos waiting behind it in one forward pass, and a crash there loses nothing."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from skimage import data
from sqlalchemy import select, update

from shared import photos
from shared.db import session_scope
from shared.ml.gestalt import RegionalEnsemble, predict
from shared.ml.imaging import decode_png_gray
from shared.modelops import registry
from shared.models import Image as ImageRow
from shared.models import ModelVersion, Result
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
            photos.queue_for_scoring(image)
        version = registry.register_model(s, get_storage(), model, ["b-one", "b-two", "b-three"], {},
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
    alone = predict(model, np.stack([decode_png_gray(get_storage().get(c.object_key))
                                     for c in _crops(ids[2], model.regions)])[None])
    np.testing.assert_allclose(results[ids[2]], alone.aggregate[0], atol=2e-4)

    # A photo's own message, arriving after the batch scored it, does nothing.
    assert pipeline.infer(ids[1]) is None


def _crops(image_id: int, regions: tuple[str, ...]):
    from shared.models import Crop, Face

    with session_scope() as s:
        by_region = {c.region: c for c in s.scalars(select(Crop).join(Face).where(Face.image_id == image_id))}
        for c in by_region.values():
            s.expunge(c)
    return [by_region[r] for r in regions]

"""Detection runs on the photos waiting behind a task in one batch; a worker on all three queues carries the
batch through alignment and scoring in one go; a claimed photo's own message waits, then goes on."""
from __future__ import annotations

import io
import time

import pytest
import torch
from PIL import Image
from skimage import data
from sqlalchemy import func, select, update

from shared.config import reload_settings
from shared.db import session_scope
from shared.ml.members.casia import casia_only
from shared.ml.nets.ensemble import RegionalEnsemble
from shared.modelops import registry
from shared.models import Crop, Face, ModelVersion, Result
from shared.models import Image as ImageRow
from shared.storage import get_storage
from tests.conftest import Portal, new_user, wait_idle
from worker import pipeline
from worker.stages import claims

pytestmark = pytest.mark.e2e


def _photo(seed: int) -> bytes:
    rgb = data.astronaut().copy()
    rgb[0, :3] = seed  # distinct photos
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _rows(ids: list[int]) -> dict[int, ImageRow]:
    with session_scope() as s:
        rows = {i.id: i for i in s.scalars(select(ImageRow).where(ImageRow.id.in_(ids)))}
        for r in rows.values():
            s.expunge(r)
    return rows


def _requeue(ids: list[int]) -> None:
    """Back to waiting for detection, as the sweep leaves photos (no messages are sent here)."""
    with session_scope() as s:
        for image in s.scalars(select(ImageRow).where(ImageRow.id.in_(ids))):
            image.status = "queued"
            image.stage_times = {"uploaded": image.stage_times["uploaded"]}


@pytest.fixture
def fuse(monkeypatch):
    def set_mode(mode: str) -> None:
        monkeypatch.setenv("GESTALT_FUSE_STAGES", mode)
        reload_settings()

    yield set_mode
    monkeypatch.delenv("GESTALT_FUSE_STAGES", raising=False)
    reload_settings()


def test_batched_detection_claims_and_the_fused_path(engines, workers, web_server, fuse):
    with session_scope() as s:  # no active model: the workers stop the photos at awaiting_model
        s.execute(update(ModelVersion).where(ModelVersion.status == "active").values(status="retired"))
    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-DETECT-BATCH")
    portal.upload(case_id, [(f"{i}.png", _photo(60 + i)) for i in range(5)])
    payload = portal.wait(case_id, timeout=180, settled=("awaiting_model", "rejected", "failed", "done"))
    ids = sorted(i["id"] for i in payload["images"])
    assert [i["status"] for i in payload["images"]] == ["awaiting_model"] * 5
    wait_idle()
    # A late message for a photo waiting for a model (a retry after Claimed, a redelivery) goes on down the
    # chain: the photo keeps its face and crops and is not detected or aligned again.
    before = _rows(ids[:1])[ids[0]].stage_times
    assert pipeline.detect(ids[0]) == ids[0] and pipeline.align(ids[0]) == ids[0]
    after = _rows(ids[:1])[ids[0]]
    assert after.status == "awaiting_model"
    assert (after.stage_times["detect_start"], after.stage_times["align_start"]) == \
        (before["detect_start"], before["align_start"])

    # Split queues: one detect call detects the four photos waiting behind it, and they go on to alignment.
    fuse("off")
    _requeue(ids)
    assert pipeline.detect(ids[0]) == ids[0]
    rows = _rows(ids)
    assert {r.status for r in rows.values()} == {"aligning"}
    assert [rows[i].stage_times.get("batched_with") for i in ids] == [None, *[ids[0]] * 4]
    assert not any(r.stage_times.get(claims.CLAIM_AT) for r in rows.values())
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Face).where(Face.image_id.in_(ids))) == 5
    # A claimed photo's own message, after the batch: its chain goes on to alignment.
    assert pipeline.detect(ids[1]) == ids[1]

    # While another worker's batch holds a photo, its own message waits; after the lease it redoes the stage.
    with session_scope() as s:
        image = s.get(ImageRow, ids[2])
        image.status = "detecting"
        image.stage_times = {**image.stage_times, claims.CLAIM_AT: time.time(), claims.CLAIM_BY: "gone@x:1"}
    with pytest.raises(claims.Claimed):
        pipeline.detect(ids[2])
    # With photos waiting for detection, the held photo's message first detects them as a batch of its own, then
    # looks at its photo again (still held here: it waits as before). The batch's photos keep their own messages.
    _requeue(ids[3:])
    with pytest.raises(claims.Claimed):
        pipeline.detect(ids[2])
    rows = _rows(ids[3:])
    assert [rows[i].status for i in ids[3:]] == ["aligning", "aligning"]
    assert [rows[i].stage_times.get("batched_with") for i in ids[3:]] == [ids[2], ids[2]]
    assert not any(r.stage_times.get(claims.CLAIM_AT) for r in rows.values())
    with session_scope() as s:
        image = s.get(ImageRow, ids[2])
        image.stage_times = {**image.stage_times, claims.CLAIM_AT: time.time() - 3600}
    assert pipeline.detect(ids[2]) == ids[2]

    # A worker on all three queues: one call detects, aligns and scores the whole batch, crops in memory.
    torch.manual_seed(0)
    model = RegionalEnsemble(("full_face", "upper_half", "middle_face", "lower_half"), 3, width=0.125).eval()
    with session_scope() as s:
        version = registry.register_model(s, get_storage(), casia_only(model, ["d-one", "d-two", "d-three"]), {},
                                          name="detect-batch-model")
        registry.activate(s, version)
        version_id = version.id
    fuse("on")
    _requeue(ids)
    assert pipeline.detect(ids[0]) is None  # nothing left for the chain
    rows = _rows(ids)
    assert {r.status for r in rows.values()} == {"done"}
    for r in rows.values():
        assert {"detect_start", "detect_end", "align_start", "align_end", "infer_start", "done"} <= set(r.stage_times)
    with session_scope() as s:
        assert s.scalar(select(func.count()).select_from(Result).where(
            Result.image_id.in_(ids), Result.model_version_id == version_id)) == 5
        regions = s.execute(select(Face.image_id, func.count(Crop.id)).join(Crop, Crop.face_id == Face.id)
                            .where(Face.image_id.in_(ids)).group_by(Face.image_id)).all()
        assert len(regions) == 5 and min(n for _, n in regions) >= 7
        assert all(s.scalars(select(Face.aligned_key).where(Face.image_id.in_(ids))))
    # The photos' own messages now find them done.
    assert all(pipeline.detect(i) is None for i in ids)


def test_batched_alignment_on_split_queues(engines, workers, web_server, fuse):
    with session_scope() as s:
        s.execute(update(ModelVersion).where(ModelVersion.status == "active").values(status="retired"))
    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-ALIGN-BATCH")
    portal.upload(case_id, [(f"{i}.png", _photo(80 + i)) for i in range(4)])
    payload = portal.wait(case_id, timeout=180, settled=("awaiting_model", "rejected", "failed", "done"))
    ids = sorted(i["id"] for i in payload["images"])
    wait_idle()
    fuse("off")
    _requeue(ids)
    assert pipeline.detect(ids[0]) == ids[0]  # all four detected, waiting for alignment
    with session_scope() as s:  # one photo lost its face: its alignment sends it back to detection
        s.execute(Face.__table__.delete().where(Face.image_id == ids[3]))
    assert pipeline.align(ids[0]) == ids[0]
    rows = _rows(ids)
    assert [rows[i].status for i in ids] == ["scoring", "scoring", "scoring", "aligning"]
    assert all("align_end" in rows[i].stage_times for i in ids[:3])
    assert rows[ids[1]].stage_times["align_start"] == rows[ids[2]].stage_times["align_start"]  # one claim
    assert not any(rows[i].stage_times.get("infer_start") for i in ids[:3])  # claimable by an infer batch
    assert pipeline.align(ids[1]) == ids[1]  # its own message: already aligned, on to scoring
    assert pipeline.align(ids[3]) == ids[3]  # detected again, then aligned
    with session_scope() as s:
        n = s.scalar(select(func.count(Crop.id)).join(Face, Crop.face_id == Face.id).where(Face.image_id == ids[3]))
    assert n >= 7
    assert _rows([ids[3]])[ids[3]].status == "scoring"

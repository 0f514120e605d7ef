"""Acceptance: a model trained on ORL ranks the held-out photo of each of the 40 people, through the portal."""
from __future__ import annotations

import pytest
from sqlalchemy import func, select

from shared.db import session_scope
from shared.models import Image, RegionScore, Result
from tests.conftest import Portal, new_user, run_cli, shared_data

pytestmark = pytest.mark.e2e


def test_orl_held_out_top5(engines, workers, web_server, tmp_path):
    orl = shared_data("faces", "orl")
    # The workers wait while it trains, so training takes both cores.
    train = run_cli(engines, "train", "--data", str(orl), "--exclude", "10.pgm", "--width", "0.25",
                    "--epochs", "12", "--lr", "0.002", "--name", "orl-test", "--activate", "--threads", "2")
    assert train.returncode == 0, train.stderr[-3000:]

    portal = Portal(web_server, new_user())
    case_id = portal.create_case("PT-ORL")
    truth = {}
    for subject in sorted(p for p in orl.iterdir() if p.is_dir()):
        r = portal.upload(case_id, [(f"{subject.name}.pgm", (subject / "10.pgm").read_bytes())])
        assert r.status_code == 201, r.text
        truth[r.json()["images"][0]["id"]] = subject.name
    assert len(truth) == 40

    payload = portal.wait(case_id, timeout=600)
    hits, statuses = 0, {}
    for image in payload["images"]:
        statuses[image["status"]] = statuses.get(image["status"], 0) + 1
        if image["status"] == "done":
            assert image["result"]["model_version"]["name"] == "orl-test"
            top5 = [r["name"] for r in image["result"]["ranking"][:5]]
            hits += truth[image["id"]] in top5
        else:
            assert image["reason"], image  # never rejected without a reason
    print(f"ORL held-out: top-5 {hits}/40, statuses {statuses}")
    assert hits / 40 >= 0.80, (hits, statuses)

    # A re-delivered infer task replaces its rows instead of adding any.
    from worker import pipeline

    image_id = next(i["id"] for i in payload["images"] if i["status"] == "done")
    with session_scope() as s:
        s.get(Image, image_id).status = "scoring"
    pipeline.infer(image_id)
    with session_scope() as s:
        assert s.get(Image, image_id).status == "done"
        # Four regions and the identity member.
        assert s.scalar(select(func.count()).select_from(RegionScore).where(RegionScore.image_id == image_id)) == 5
        assert s.scalar(select(func.count()).select_from(Result).where(Result.image_id == image_id)) == 1

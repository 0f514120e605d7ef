"""Nightly retraining on the real stack: diagnoses arrive, retrain.nightly promotes a better model,
new uploads are scored by it; a worse candidate is rejected; a killed run leaves state consistent."""
from __future__ import annotations

import dataclasses
import time

import pytest
import requests
from sqlalchemy import select, update

from shared.config import get_settings
from shared.db import session_scope
from shared.ml.members.casia import casia_only
from shared.modelops.registry import active_version
from shared.modelops.retrain import run_retrain
from shared.models import Diagnosis, ModelVersion, Syndrome, TrainingRun
from shared.stack import Process
from tests.conftest import Portal, _env, new_user, run_cli, shared_data

pytestmark = pytest.mark.e2e
BASE = [f"s{i}" for i in range(1, 11)]
NEW = ["s11", "s12", "s13"]
RETRAIN_ENV = {"GESTALT_RETRAIN_MIN_SUBJECTS": "2", "GESTALT_RETRAIN_HOLDOUT": "0.34", "GESTALT_RETRAIN_EPOCHS": "40"}


def _trainer(engines, name: str, **extra_env) -> Process:
    env = {**_env(engines), **RETRAIN_ENV, **extra_env}
    import sys

    return Process(name, [sys.executable, "-m", "shared.cli", "worker", "-Q", "train", "-c", "1", "-n",
                          f"{name}@%h"], env, engines.logs / f"{name}.log")


def _wait_run(after_id: int, timeout: float = 300) -> TrainingRun:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as s:
            run = s.scalars(select(TrainingRun).where(TrainingRun.id > after_id)
                            .order_by(TrainingRun.id.desc())).first()
            if run is not None and run.status not in ("running",):
                s.expunge(run)
                return run
        time.sleep(0.5)
    raise AssertionError("the retraining run did not finish")


def _last_run_id() -> int:
    with session_scope() as s:
        return s.scalar(select(TrainingRun.id).order_by(TrainingRun.id.desc()).limit(1)) or 0


def test_nightly_retraining(engines, workers, web_server, tmp_path):
    orl = shared_data("faces", "orl")
    base_dir = tmp_path / "base"
    for name in BASE:
        (base_dir / name).mkdir(parents=True)
        for i in range(1, 10):
            (base_dir / name / f"{i}.pgm").symlink_to(orl / name / f"{i}.pgm")
    # The CASIA-Nets with the identity member: the configuration whose full fine-tune (every layer, from the stored
    # crops) the night can also run; encoder models are refitted as heads (tests/test_day_one.py).
    trained = run_cli(engines, "train", "--data", str(base_dir), "--backbone", "casia", "--width", "0.125",
                      "--epochs", "4", "--lr", "0.003", "--name", "retrain-base", "--activate")
    assert trained.returncode == 0, trained.stderr[-3000:]
    with session_scope() as s:
        base_version = active_version(s)
        assert base_version.name == "retrain-base" and base_version.config["base_features_key"]
        base_id = base_version.id
        for name in NEW:  # the catalogue knows the new syndromes; the model does not yet
            if not s.scalars(select(Syndrome).where(Syndrome.name == name)).first():
                s.add(Syndrome(name=name, genes=[]))

    # Diagnoses arrive: three patients (cases) per new syndrome, three photos each, with consent.
    portal = Portal(web_server, new_user())
    case_ids = []
    for name in NEW:
        for first in (1, 4, 7):
            case_id = portal.create_case(f"PT-{name}-{first}")
            for i in range(first, first + 3):
                assert portal.upload(case_id, [(f"{i}.pgm", (orl / name / f"{i}.pgm").read_bytes())]).status_code == 201
            case_ids.append((case_id, name))
    no_consent = portal.create_case("PT-NOCONSENT")
    portal.upload(no_consent, [("x.pgm", (orl / "s14" / "1.pgm").read_bytes())])
    for case_id, _ in case_ids + [(no_consent, None)]:
        portal.wait(case_id)
    token = portal.csrf("/")
    for case_id, name in case_ids:
        r = portal.http.post(f"{web_server}/api/v1/cases/{case_id}/diagnosis", headers={"X-CSRFToken": token},
                             json={"syndrome": name, "kind": "clinical", "consent": True})
        assert r.status_code == 200, r.text
    r = portal.http.post(f"{web_server}/api/v1/cases/{no_consent}/diagnosis", headers={"X-CSRFToken": token},
                         json={"syndrome": "s11", "kind": "clinical", "consent": False})
    assert r.status_code == 200
    r = portal.http.post(f"{web_server}/api/v1/cases/{no_consent}/diagnosis", headers={"X-CSRFToken": token},
                         json={"syndrome": "no such syndrome", "kind": "clinical"})
    assert r.status_code == 400 and "unknown syndrome" in r.json()["error"]

    # Other tests' consented diagnoses (an imported archive, a clinic's first patients) would join this night's
    # training set; this test checks a night of its own, so their consent is withdrawn first.
    ours = {case_id for case_id, _ in case_ids}
    with session_scope() as s:
        s.execute(update(Diagnosis).where(Diagnosis.case_id.not_in(ours)).values(consent=False))

    # retrain.nightly on a real `train` worker.
    trainer = _trainer(engines, "trainer")
    trainer.start()
    try:
        from worker.tasks.retrain import nightly

        before = _last_run_id()
        nightly.apply_async(kwargs={"trigger": "admin"})
        run = _wait_run(before)
    finally:
        trainer.stop(timeout=30)
    assert run.status == "promoted", (run.decision, run.counts)
    assert run.counts["new_classes"] == NEW
    # Features of this test's photos were cached when they were scored; only diagnosed photos that other
    # tests left in the shared database (scored by other models, other backbones) needed computing.
    from shared.modelops.retrain import diagnosed_images

    with session_scope() as s:
        others = [d for d in diagnosed_images(s) if int(d[2].split(":")[1]) not in ours]
    assert run.counts["features_computed"] == len(others), (run.counts, others)
    assert run.counts["case_images"] == 27  # the unconsented case is not used
    assert run.metrics["candidate"]["per_image"]["top1"]["value"] >= run.metrics["active"]["per_image"]["top1"]["value"]
    with session_scope() as s:
        active = active_version(s)
        assert active.id == run.candidate_version_id and len(active.classes) == 13
        assert s.get(ModelVersion, base_id).status == "retired"
        new_name = active.name
        # The identity member came along, its head refitted on the night's photos from the same descriptors (the
        # same encoder and mirror average), with its weight in the refitted stack.
        member, base_member = (v.config["members"]["identity"] for v in (active, s.get(ModelVersion, base_id)))
        assert member == base_member and member["names"] == ["identity"]
        assert set(active.config["weights"]) == set(s.get(ModelVersion, base_id).config["weights"])
        assert sum(active.config["weights"].values()) == pytest.approx(1.0, abs=1e-3)
    bench = run_cli(engines, "heads-benchmark", "--model", "retrain-base", "--folds", "3")
    assert bench.returncode == 0, bench.stderr[-2000:]
    # Every member out of fold beside the stack's aggregate, with their weights (rich wraps the cells' words).
    assert all(word in bench.stdout for word in ("identity", "aggregate", "weight")), bench.stdout
    assert bench.stdout.strip().splitlines()[-1].startswith("top1=")

    # A new upload is scored by the new model (workers notice it without a restart).
    case_id = portal.create_case("PT-NEW")
    portal.upload(case_id, [("10.pgm", (orl / "s12" / "10.pgm").read_bytes())])
    image = portal.wait(case_id)["images"][0]
    assert image["status"] == "done" and image["result"]["model_version"]["name"] == new_name
    assert "s12" in [r["name"] for r in image["result"]["ranking"][:13]]
    # Old results keep their version and are flagged as outdated.
    old = portal.case(case_ids[0][0])["images"][0]["result"]
    assert old["model_version"]["name"] == "retrain-base" and old["outdated"]
    r = portal.http.post(f"{web_server}/api/v1/images/{portal.case(case_ids[0][0])['images'][0]['id']}/rescore",
                         headers={"X-CSRFToken": token})
    assert r.status_code == 202

    # A deliberately worse candidate (shuffled labels) is rejected, with its reason.
    settings = dataclasses.replace(get_settings(), retrain_min_subjects=2, retrain_holdout_fraction=0.34)
    bad = run_retrain("cli", shuffle_labels=True, settings=settings)
    with session_scope() as s:
        run = s.get(TrainingRun, bad)
        assert run.status == "rejected" and "fell" in run.decision, run.decision
        assert s.get(ModelVersion, run.candidate_version_id).status == "rejected"
        assert active_version(s).name == new_name

    # A full fine-tune (every layer, from the stored crops) runs through the same guard.
    full = run_retrain("cli", kind="full", settings=dataclasses.replace(settings, retrain_full_epochs=2))
    with session_scope() as s:
        run = s.get(TrainingRun, full)
        assert run.kind == "full" and run.status in ("promoted", "rejected"), (run.status, run.decision)
        candidate = s.get(ModelVersion, run.candidate_version_id)
        casia_key = candidate.config["members"]["casia"]["feature_key"]
        assert casia_key != s.get(ModelVersion, base_id).config["members"]["casia"]["feature_key"]
        assert candidate.config["base_features_key"] != base_version.config["base_features_key"]
        assert run.metrics["candidate"]["per_image"]["top1"]["n"] == run.counts["holdout_images"]
        new_name = active_version(s).name  # promoted or not, the active model is consistent

    # Killing the training worker mid-run leaves the active model and the lock consistent.
    slow = _trainer(engines, "trainer-slow", GESTALT_RETRAIN_EPOCHS="4000")
    slow.start()
    try:
        before = _last_run_id()
        nightly.apply_async(kwargs={"trigger": "admin"})
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with session_scope() as s:
                running = s.scalars(select(TrainingRun).where(TrainingRun.id > before,
                                                              TrainingRun.status == "running")).first()
            if running:
                break
            time.sleep(0.05)
        assert running, "the run did not start"
        time.sleep(1.0)
        slow.kill()
    finally:
        slow.stop()
    with session_scope() as s:
        assert active_version(s).name == new_name
    # PostgreSQL frees the dead worker's lock once it sees the connection close (within moments).
    deadline = time.monotonic() + 30
    while True:
        dry = run_retrain("cli", dry_run=True, settings=settings)
        with session_scope() as s:
            status = s.get(TrainingRun, dry).status
        if status != "skipped" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    with session_scope() as s:
        assert s.get(TrainingRun, running.id).status == "failed"
        assert "interrupted" in s.get(TrainingRun, running.id).decision
        assert s.get(TrainingRun, dry).status == "dry_run"
        assert active_version(s).name == new_name
    # The killed task is redelivered to a future `train` worker; it then runs cleanly under the lock.
    assert requests.get(web_server + "/healthz").ok


def test_a_candidate_passed_while_the_active_model_changed_is_logged_as_rejected(engines, caplog):
    """The guard agreed, but another model was activated during the run: the candidate is stored as rejected and the
    log line says ``rejected`` (what was stored), with the decision recorded on the run."""
    import os

    import torch

    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.train.heads import GuardResult
    from shared.modelops import registry, retrain
    from shared.storage import get_storage

    torch.manual_seed(0)
    model = casia_only(RegionalEnsemble(("full_face",), 2, width=0.125).eval(), ["t-a", "t-b"])
    with session_scope() as s:
        start = registry.register_model(s, get_storage(), model, {}, name=f"retrain-log-start-{os.getpid()}")
        run = TrainingRun(trigger="cli", status="running", kind="heads", base_version_id=start.id)
        s.add(run)
        s.flush()
        run_id, start_id = run.id, start.id  # the run starts from a version that is not (or no longer) active
    base = retrain._Base(version_id=start_id, name=f"retrain-log-start-{os.getpid()}", classes=["t-a", "t-b"],
                         config={}, features_key="", crops_key=None, model=model, features={})
    guard = GuardResult(promote=True, reason="the candidate is at least as good", candidate={}, active={})
    caplog.set_level("INFO", logger="shared.modelops.retrain")
    retrain._register(run_id, get_storage(), base, model, guard, {},
                      {"counts": {}, "durations": {}, "metrics": {}})
    with session_scope() as s:
        run = s.get(TrainingRun, run_id)
        assert run.status == "rejected" and run.decision.startswith("the active model changed during the run")
        assert s.get(ModelVersion, run.candidate_version_id).status == "rejected"
    assert f"retrain run={run_id} status=rejected the active model changed during the run" in caplog.text
    assert "status=promoted" not in caplog.text

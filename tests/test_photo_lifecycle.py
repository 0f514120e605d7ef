"""A photo's life in any order of events, checked by hypothesis's ``RuleBasedStateMachine``.

The machine drives the real code in this process against the real PostgreSQL and object store: the
portal's upload (``web.uploads.store_images``), the pipeline's stages (``worker.pipeline`` detect,
align and infer, with stand-in detector and landmark networks and two small real models), the
portal's cancel, retry and rescore (the calls ``web/admin.py`` and ``web/api.py`` make), case
deletion (``shared.lifecycle.delete_case``), the sweep and model activation. The broker is a list of
messages that the machine delivers as Celery would: a stage's result goes on down its chain,
``Claimed`` sends the message again (for infer: its alignment and scoring), and a worker that dies
before a commit leaves its message to be delivered again. Two workers interleave: one is paused after
any of its commits (no lock held) while the other rules run, then resumes as a late writer.

After every step: each status change is a row of ``shared.photos.TRANSITIONS``; a cancelled photo is
never done; a deleted case leaves no row and no object; every done photo has a result from the model
its card shows, the case ranking uses one model; and every unfinished photo has a way forward (a
message, a held batch, or the sweep), which the end of each example proves by delivering everything.
"""
from __future__ import annotations

import io
import itertools
import threading
from collections import Counter
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from PIL import Image as PILImage
from skimage import data
from sqlalchemy import event, func, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.base import NO_VALUE

from shared import photos
from shared.config import get_settings
from shared.db import get_engine, session_scope
from shared.ml.members.casia import casia_only
from shared.models import Case, Crop, Face, Image, ImageStatus, ModelVersion, Result
from shared.storage import Storage, aligned_key, crops_prefix, get_storage
from worker.stages.claims import CLAIM_AT

pytestmark = pytest.mark.e2e

REGIONS = ("full_face", "upper_half")
SIDE = 192  # small photos: decoding and storing them costs little
SETTLED = {ImageStatus.done.value, ImageStatus.rejected.value, ImageStatus.failed.value}
PAIRS = {(s.value if s else None, t.value) for s, _, t in photos.TRANSITIONS}
CHAIN = ("detect", "align", "infer")
EXAMPLES = 200  # sequences of at most ten steps after the start


class Crash(BaseException):  # noqa: N818 - a process dying, not an error to handle
    """The worker process died: nothing it does from here on commits, and its message is delivered again."""


@dataclass
class Plan:
    """One delivery of a message: which worker (its claims), and where it dies or pauses."""

    worker: str
    fused: bool = False
    crash_at: int | None = None  # the task dies before its n-th commit
    pause_after: int | None = None  # the task waits after its n-th commit (no lock held) until resumed
    commits: int = 0
    dead: bool = False
    paused: threading.Event = field(default_factory=threading.Event)
    resume: threading.Event = field(default_factory=threading.Event)


_local = threading.local()
_changes: list[tuple[int | None, str | None, str]] = []  # every status the ORM set: (photo, from, to)


def _plan() -> Plan | None:
    return getattr(_local, "plan", None)


def _before_commit(session: Session) -> None:
    plan = _plan()
    if plan is not None and (plan.dead or plan.crash_at == plan.commits + 1):
        plan.dead = True
        raise Crash()


def _after_commit(session: Session) -> None:
    plan = _plan()
    if plan is None:
        return
    plan.commits += 1
    if plan.pause_after == plan.commits:
        plan.paused.set()
        plan.resume.wait()


def _status_set(target: Image, value: str, old: object, initiator: object) -> None:
    _changes.append((target.id, None if old in (NO_VALUE, None) else old, value))


_BASE: list[bytes] = []
# What the stand-in networks find in a photo, marked in its centre (where a turned photo keeps it).
FACE, NO_FACE, NO_LANDMARKS = 0, 1, 2


def _photo(seed: int, kind: int = FACE) -> bytes:
    if not _BASE:
        _BASE.append(PILImage.fromarray(data.astronaut()).resize((SIDE, SIDE)).tobytes())
    pixels = bytearray(_BASE[0])
    pixels[0:3] = bytes(((seed >> 16) & 255, (seed >> 8) & 255, seed & 255))  # distinct photos
    for row in range(SIDE // 2 - 1, SIDE // 2 + 2):
        start = 3 * (row * SIDE + SIDE // 2 - 1)
        pixels[start:start + 9] = bytes((kind,) * 9)
    buf = io.BytesIO()
    PILImage.frombytes("RGB", (SIDE, SIDE), bytes(pixels)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _kind(rgb) -> int:
    h, w = rgb.shape[:2]
    return int(rgb[h // 2, w // 2, 0])


KINDS = st.sampled_from([FACE] * 4 + [NO_FACE, NO_LANDMARKS])


_puts: list[str] = []  # every key the object store was asked to write
_moves: Counter = Counter()  # (state, event, next state) of every move, over all examples


@dataclass
class World:
    owner_id: int
    models: list[int]
    preprocessor: object
    messages: list = field(default_factory=list)  # the broker: (stages, photo id)


@pytest.fixture(scope="module")
def world(engines):
    """The stand-in networks, two registered models, the broker list and the commit hooks, for the module."""
    import numpy as np

    from bench._pipeline.photos import known_face
    from bench._pipeline.stand_ins import KnownFaceDetector, KnownFaceLandmarks
    from shared import dispatch
    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.modelops import registry
    from shared.users import find_user
    from tests.conftest import new_user
    from worker import celery_app
    from worker.stages import claims, resources

    class Detector(KnownFaceDetector):  # the known face, except in the photos marked as having none
        def detect_batch(self, images):
            return [[] if _kind(rgb) == NO_FACE else f for rgb, f in
                    zip(images, super().detect_batch(images), strict=True)]

    class Landmarks(KnownFaceLandmarks):  # the known face's landmarks, except in the photos marked otherwise
        def landmarks_batch(self, images, boxes):
            found = super().landmarks_batch(images, boxes)
            return [None if _kind(rgb) == NO_LANDMARKS else lm for rgb, lm in zip(images, found, strict=True)]

    face = known_face(np.asarray(PILImage.fromarray(data.astronaut())))
    pre = Preprocessor.__new__(Preprocessor)
    pre.min_confidence, pre.regions = 0.5, REGIONS
    pre.detector, pre.mesh = Detector(face), Landmarks(face)
    email = new_user()
    with session_scope() as s:
        owner_id = find_user(s, email).id
        before = registry.active_version(s)
        before_id = before.id if before else None
        models = []
        for seed, name in enumerate(("a", "b")):
            torch.manual_seed(seed)
            model = RegionalEnsemble(REGIONS, 3, width=0.125).eval()
            version = registry.register_model(s, get_storage(), casia_only(model, ["l-one", "l-two", "l-three"]), {},
                                              name=f"lifecycle-{name}-{email[:12]}")
            models.append(version.id)
    world = World(owner_id, models, pre)
    mp = pytest.MonkeyPatch()
    mp.setattr(resources, "preprocessor", lambda: pre)
    mp.setattr(resources, "_models", registry.ModelCache(check_seconds=0.0, device="cpu"))
    mp.setattr(claims, "claimer", lambda: _plan().worker if _plan() else "test:0")
    mp.setattr(celery_app, "fuses_stages", lambda: bool(_plan() and _plan().fused))
    mp.setattr(dispatch, "enqueue_photo", lambda image_id: world.messages.append((CHAIN, image_id)))
    move = photos.move

    def counted_move(image, status, event_, *args, **kwargs):
        source = image.status
        move(image, status, event_, *args, **kwargs)
        _moves[source, event_.value, status.value] += 1

    mp.setattr(photos, "move", counted_move)
    put = Storage.put
    mp.setattr(Storage, "put", lambda self, key, *a, **k: (_puts.append(key), put(self, key, *a, **k))[1])
    threads = torch.get_num_threads()
    registry.set_torch_threads(get_settings().torch_threads)  # as a worker process does
    listeners = [(Session, "before_commit", _before_commit), (Session, "after_commit", _after_commit),
                 (Image.status, "set", _status_set)]
    for target, name, fn in listeners:
        event.listen(target, name, fn)

    def lock_timeout(dbapi_connection, record) -> None:
        with dbapi_connection.cursor() as cur:
            cur.execute("SET lock_timeout = '10s'")  # a lock wait between the two workers fails, never hangs
            cur.execute("SET synchronous_commit = off")  # no crash of PostgreSQL itself is tested here

    get_engine().dispose()
    event.listen(get_engine(), "connect", lock_timeout)
    yield world
    event.remove(get_engine(), "connect", lock_timeout)
    for target, name, fn in listeners:
        event.remove(target, name, fn)
    mp.undo()
    torch.set_num_threads(threads)
    with session_scope() as s:
        if before_id is not None:
            registry.activate(s, s.get(ModelVersion, before_id))
        else:
            s.execute(update(ModelVersion).where(ModelVersion.id.in_(models)).values(status="retired"))
    _forget(owner_id)


def _forget(owner_id: int) -> None:
    """The module's cases and their objects, gone (the suite's later tests see none of its photos)."""
    from concurrent.futures import ThreadPoolExecutor

    from shared.storage import crops_key

    with session_scope() as s:
        keys = [k for sha, original in s.execute(select(Image.sha256, Image.object_key).join(Case).where(
            Case.owner_id == owner_id)) for k in (original, aligned_key(sha), crops_key(sha))]
        s.execute(Case.__table__.delete().where(Case.owner_id == owner_id))
    storage = get_storage()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(storage.delete, keys))


def _waiting_for(stage: str):
    """A precondition: a message for ``stage`` is waiting."""
    return lambda machine: any(stages[0] == stage for stages, _ in machine.world.messages)


class PhotoLife(RuleBasedStateMachine):
    world: World

    def __init__(self) -> None:
        super().__init__()
        self.workers = itertools.count(1)
        self.cases: dict[int, list[int]] = {}  # live case -> its photos
        self.deleted: dict[int, str] = {}  # photo of a deleted case -> its sha256
        self.cancelled: set[int] = set()
        self.paused: tuple[threading.Thread, Plan, tuple, dict] | None = None
        self.active: int | None = None  # the active model version (this machine activates them)
        self.checked: tuple | None = None
        self.rows: dict[int, tuple] = {}  # what the invariants read after the last step
        self.world.messages.clear()
        _changes.clear()
        _puts.clear()

    # ------------------------------------------------------------------ delivering messages
    def _deliver(self, msg: tuple, plan: Plan) -> dict:
        """Run the message's first stage as ``plan``'s worker; returns what happened (for :meth:`_settle`)."""
        from worker import pipeline
        from worker.stages.claims import Claimed

        stages, image_id = msg
        _local.plan = plan
        try:
            out = getattr(pipeline, stages[0])(image_id)
            return {"next": out}
        except Claimed:
            return {"claimed": True}
        except Crash:
            return {"crashed": True}
        except Exception as exc:  # noqa: BLE001 - reported by _settle in the machine's thread
            return {"error": exc}
        finally:
            _local.plan = None

    def _settle(self, msg: tuple, outcome: dict) -> None:
        """What the task layer and the broker do with the outcome (worker/tasks/pipeline.py)."""
        stages, image_id = msg
        if "error" in outcome:
            raise outcome["error"]
        if outcome.get("crashed"):  # not acknowledged: delivered again
            self.world.messages.append(msg)
        elif outcome.get("claimed"):  # a new message after the wait; infer re-sends its alignment too
            self.world.messages.append((("align", "infer") if stages[0] == "infer" else stages, image_id))
        elif outcome["next"] is not None and len(stages) > 1:
            self.world.messages.append((stages[1:], outcome["next"]))

    def _take(self, k: int) -> tuple:
        return self.world.messages.pop(k % len(self.world.messages))

    def _run(self, msg: tuple, **faults) -> None:
        self._settle(msg, self._deliver(msg, Plan(f"w{next(self.workers)}", **faults)))

    # ------------------------------------------------------------------ rules
    @initialize(active=st.sampled_from([None, 0, 1]), kinds=st.lists(KINDS, min_size=1, max_size=3),
                advanced=st.sampled_from(["uploaded", "detected", "aligned", "scored"]))
    def start(self, active: int | None, kinds: list[int], advanced: str) -> None:
        """No model or one of the two active, and a case with up to three photos, just uploaded or already taken
        through some stages (so that twelve steps reach the later states too)."""
        with session_scope() as s:
            s.execute(update(ModelVersion).where(ModelVersion.status == "active").values(status="retired"))
        if active is not None:
            self.activate(active)
        self.upload(kinds, new_case=True)
        if advanced == "scored":  # a worker on every queue takes the batch through all three stages
            self._run(self._stage("detect", 0), fused=True)
            return
        for stage in ("detect", "align")[:("uploaded", "detected", "aligned").index(advanced)]:
            while any(stages[0] == stage for stages, _ in self.world.messages):
                self._run(self._stage(stage, 0))

    @precondition(lambda self: sum(len(p) for p in self.cases.values()) < 3)
    @rule(kinds=st.lists(KINDS, min_size=1, max_size=2), new_case=st.booleans())
    def upload(self, kinds: list[int], new_case: bool) -> None:
        """The portal's upload (web/uploads.py): stored, committed, then the whole chain for each photo."""
        from web.uploads import store_images, validate_files

        with session_scope() as s:
            if new_case or not self.cases:
                case = Case(owner_id=self.world.owner_id, patient_ref="PT-LIFE", sex="unknown")
                s.add(case)
                s.commit()
            else:
                case = s.get(Case, next(iter(self.cases)))
            decoded = validate_files([(f"{n}.png", _photo(next(_seeds), kind)) for n, kind in enumerate(kinds)])
            images = store_images(s, case, decoded, self.world.owner_id, None)
            self.cases.setdefault(case.id, []).extend(i.id for i in images)
        _moves[None, photos.Event.upload.value, ImageStatus.queued.value] += len(images)

    def _stage(self, stage: str, k: int) -> tuple:
        waiting = [n for n, (stages, _) in enumerate(self.world.messages) if stages[0] == stage]
        return self.world.messages.pop(waiting[k % len(waiting)])

    @precondition(_waiting_for("detect"))
    @rule(k=st.integers(0, 15), fused=st.booleans())
    def detect(self, k: int, fused: bool) -> None:
        """A detect message is delivered (a worker on every queue carries its batch through all three stages)."""
        self._run(self._stage("detect", k), fused=fused)

    @precondition(_waiting_for("align"))
    @rule(k=st.integers(0, 15))
    def align(self, k: int) -> None:
        self._run(self._stage("align", k))

    @precondition(_waiting_for("infer"))
    @rule(k=st.integers(0, 15))
    def score(self, k: int) -> None:
        self._run(self._stage("infer", k))

    @precondition(lambda self: self.world.messages)
    @rule(k=st.integers(0, 15), at=st.integers(1, 5), fused=st.booleans())
    def crash_before_commit(self, k: int, at: int, fused: bool) -> None:
        self._run(self._take(k), fused=fused, crash_at=at)

    @precondition(lambda self: self.world.messages)
    @rule(k=st.integers(0, 15))
    def duplicate_message(self, k: int) -> None:
        self.world.messages.append(self.world.messages[k % len(self.world.messages)])

    @precondition(lambda self: self.world.messages)
    @rule(k=st.integers(0, 15))
    def retries_exhausted(self, k: int) -> None:
        """The task's retries ran out (engines down): its on_failure marks the photo failed; the message is gone."""
        _, image_id = self._take(k)
        photos.mark_failed(image_id, "infer failed after 10 retries: services unavailable")

    @precondition(lambda self: self.world.messages and self.paused is None)
    @rule(k=st.integers(0, 15), after=st.integers(1, 5), fused=st.booleans())
    def start_second_worker(self, k: int, after: int, fused: bool) -> None:
        """A worker that stops after one of its commits (holding no lock) while the other rules run."""
        msg = self._take(k)
        plan = Plan(f"w{next(self.workers)}", fused=fused, pause_after=after)
        box: dict = {}
        thread = threading.Thread(target=lambda: box.update(self._deliver(msg, plan)), daemon=True)
        thread.start()
        while thread.is_alive() and not plan.paused.wait(0.005):
            pass
        if thread.is_alive():
            self.paused = (thread, plan, msg, box)
        else:
            self._settle(msg, box)

    @precondition(lambda self: self.paused is not None)
    @rule()
    def second_worker_goes_on(self) -> None:
        thread, plan, msg, box = self.paused
        self.paused = None
        plan.resume.set()
        thread.join(60)
        assert not thread.is_alive(), "the resumed worker did not finish"
        self._settle(msg, box)

    @precondition(lambda self: self.cases)
    @rule(k=st.integers(0, 15))
    def cancel(self, k: int) -> None:
        """The admin's cancel (web/admin.py): lock, ask the table, move, commit."""
        image_id = self._pick(k, photos.Event.cancel)
        with session_scope() as s:
            image = photos.lock(s, image_id)
            if image is not None and photos.allows(image.status, photos.Event.cancel):
                photos.cancel(image)
                self.cancelled.add(image_id)

    @precondition(lambda self: self.cases)
    @rule(k=st.integers(0, 15))
    def retry(self, k: int) -> None:
        """The admin's retry of a failed photo (web/admin.py): then its whole chain."""
        image_id = self._pick(k, photos.Event.retry)
        with session_scope() as s:
            image = photos.lock(s, image_id)
            sent = image is not None and photos.allows(image.status, photos.Event.retry)
            if sent:
                photos.retry(image)
        if sent:
            self.world.messages.append((CHAIN, image_id))

    @precondition(lambda self: self.cases)
    @rule(k=st.integers(0, 15))
    def rescore(self, k: int) -> None:
        """The API's rescore (web/api.py): with crops stored, infer; else the whole chain."""
        image_id = self._pick(k, photos.Event.rescore)
        with session_scope() as s:
            image = photos.lock(s, image_id)
            sent = image is not None and photos.allows(image.status, photos.Event.rescore)
            if sent:
                photos.rescore(image)
                stages = ("infer",) if image.status == ImageStatus.scoring.value else CHAIN
        if sent:
            self.cancelled.discard(image_id)
            self.world.messages.append((stages, image_id))

    @precondition(lambda self: self.cases)
    @rule(k=st.integers(0, 7))
    def delete_case(self, k: int) -> None:
        from shared.lifecycle import delete_case

        case_id = sorted(self.cases)[k % len(self.cases)]
        with session_scope() as s:
            gone = {i.id: (i.sha256, i.object_key) for i in s.scalars(select(Image).where(Image.case_id == case_id))}
            delete_case(s, get_storage(), s.get(Case, case_id), None, "lifecycle test")
        del self.cases[case_id]
        storage = get_storage()
        for image_id, (sha, original) in gone.items():
            self.deleted[image_id] = sha
            left = storage.list(crops_prefix(sha)) + [k for k in (original, aligned_key(sha)) if storage.exists(k)]
            assert not left, f"photo {image_id} of the deleted case left objects: {left}"

    @precondition(lambda self: self.cases)
    @rule(k=st.integers(0, 7), face=st.booleans())
    def outputs_lost(self, k: int, face: bool) -> None:
        """A face's crops (or the face itself) are gone, or were never made for a photo aligned long ago: scoring
        aligns it again, alignment detects it again."""
        image_id = self._photo(k)
        with session_scope() as s:
            found = s.scalars(select(Face).where(Face.image_id == image_id)).first()
            if found is not None and face:
                s.delete(found)  # its crops go with it
            elif found is not None:
                s.execute(Crop.__table__.delete().where(Crop.face_id == found.id))

    def leases_run_out(self) -> None:
        """Time passes: every batch's claim has lapsed (a paused worker's too)."""
        self._age(None)

    @rule(wait=st.sampled_from(["lease", "lease", "requeue", "requeue", "requeue", "give up"]))
    def sweep(self, wait: str = "requeue") -> None:
        """Time passes: beyond the claims' lease, or beyond GESTALT_REQUEUE_AFTER_SECONDS (now and then beyond
        GESTALT_GIVE_UP_SECONDS) and the sweep runs (worker.pipeline.sweep). Messages for other tests' photos are
        not ours to deliver."""
        from worker import pipeline

        if wait == "lease":
            return self.leases_run_out()
        self._age(7 if wait == "give up" else 0)
        ours = set(self._ours())
        pipeline.sweep(lambda i: self.world.messages.append((CHAIN, i)) if i in ours else None,
                       lambda i: self.world.messages.append((("infer",), i)) if i in ours else None)

    @rule(model=st.integers(0, 1))
    def activate(self, model: int) -> None:
        """Another model is activated (the portal's admin page, gestalt models activate)."""
        from shared.modelops import registry

        with session_scope() as s:
            registry.activate(s, s.get(ModelVersion, self.world.models[model]))
        self.active = self.world.models[model]

    # ------------------------------------------------------------------ helpers
    def _photo(self, k: int) -> int:
        ids = sorted(i for p in self.cases.values() for i in p)
        return ids[k % len(ids)]

    def _pick(self, k: int, action: photos.Event) -> int:
        """Mostly a photo the table lets ``action`` move (the others are refused, which ``k >= 12`` tries)."""
        if k >= 12:
            return self._photo(k)
        # The statuses the invariants read after the last step (nothing has moved a photo since).
        able = sorted(i for i in self._ours() if i in self.rows and photos.allows(self.rows[i][1], action))
        return able[k % len(able)] if able else self._photo(k)

    def _ours(self) -> list[int]:
        return [i for p in self.cases.values() for i in p]

    def _age(self, hours: float | None) -> None:
        """Every claim on our photos lapses; with ``hours``, the photos were last touched (and uploaded) that
        long ago (the sweep re-queues them, or gives up after GESTALT_GIVE_UP_SECONDS)."""
        ids = self._ours()
        with session_scope() as s:
            s.execute(update(Image).where(Image.id.in_(ids), Image.stage_times.has_key(CLAIM_AT)).values(
                stage_times=Image.stage_times.op("||")(func.jsonb_build_object(
                    CLAIM_AT, Image.stage_times[CLAIM_AT].as_float() - 3600)),
                updated_at=Image.updated_at))  # the claim lapses; the photo's own clock does not move
            if hours is not None:
                ago = func.now() - func.make_interval(0, 0, 0, 0, int(hours), 1)
                s.execute(update(Image).where(Image.id.in_(ids)).values(
                    updated_at=ago, created_at=func.least(Image.created_at, ago)))

    # ------------------------------------------------------------------ invariants
    @invariant()
    def the_rules_of_a_photos_life_hold(self) -> None:
        """After every step: one read of our photos, then each rule (the names below say which failed)."""
        ids = [*self._ours(), *self.cancelled, *self.deleted]
        with session_scope() as s:
            rows = {i: (case, status, updated) for i, case, status, updated in s.execute(
                select(Image.id, Image.case_id, Image.status, Image.updated_at).where(Image.id.in_(ids)))}
        self.rows = rows
        self.every_status_change_is_in_the_table()
        self.a_cancelled_photo_never_becomes_done(rows)
        self.a_deleted_case_leaves_no_row_and_no_object(rows)
        self.done_photos_show_a_result_of_the_ranking_model(rows)
        self.every_unfinished_photo_has_a_way_forward(rows)

    def every_status_change_is_in_the_table(self) -> None:
        changes, _changes[:] = list(_changes), []
        illegal = [(i, a, b) for i, a, b in changes if (a, b) not in PAIRS]
        assert not illegal, f"status changes outside shared.photos.TRANSITIONS: {illegal}"

    def a_cancelled_photo_never_becomes_done(self, rows: dict) -> None:
        done = [i for i in self.cancelled if i in rows and rows[i][1] == ImageStatus.done.value]
        assert not done, f"cancelled photos came back done: {done}"

    def a_deleted_case_leaves_no_row_and_no_object(self, rows: dict) -> None:
        """No photo row (faces, crops, scores and results go with it); no object of the photo, whether the deletion
        missed it or a late worker stored it afterwards."""
        left = [i for i in self.deleted if i in rows]
        assert not left, f"photos of deleted cases still have rows: {left}"
        shas = set(self.deleted.values())
        written, _puts[:] = [k for k in _puts if any(sha in k for sha in shas)], []
        storage = get_storage()
        kept = [k for k in written if storage.exists(k)]
        assert not kept, f"objects of deleted photos stored after their case was deleted: {kept}"

    def done_photos_show_a_result_of_the_ranking_model(self, rows: dict) -> None:
        """Every done photo has a result, its card shows the case ranking's model wherever that model scored it,
        and the ranking is the active model's whenever the active model scored one of the case's photos."""
        from shared.services.ranking import case_ranking, photo_result

        signature = (self.active, tuple(sorted((i, r[1]) for i, r in rows.items())))
        if signature == self.checked:
            return  # no photo moved and no model was activated: the results are those already checked
        self.checked = signature
        with session_scope() as s:
            for case_id, ids in self.cases.items():
                done = [i for i in ids if rows[i][1] == ImageStatus.done.value]
                ranking = case_ranking(s, case_id, self.active)
                assert (ranking is None) == (not done), f"case {case_id}: {len(done)} done photos, ranking {ranking}"
                if not done:
                    continue
                assert ranking.photos + ranking.left_out == len(done)
                for image_id in done:
                    shown = photo_result(s, image_id, ranking.version.id)
                    assert shown is not None, f"done photo {image_id} has no result"
                    assert image_id not in ranking.image_ids or shown.model_version_id == ranking.version.id
                by_active = self.active is not None and s.scalar(select(func.count()).select_from(Result).where(
                    Result.image_id.in_(done), Result.model_version_id == self.active))
                assert not by_active or ranking.version.id == self.active

    def every_unfinished_photo_has_a_way_forward(self, rows: dict) -> None:
        """A photo in a running state has a message or a held batch, or the sweep sees it (it needs updated_at);
        a photo waiting for a model is woken by the sweep once one is active (:meth:`teardown` delivers all)."""
        waiting = {i for _, i in self.world.messages} | ({self.paused[2][1]} if self.paused else set())
        stuck = [i for i in self._ours() if rows[i][1] in photos.ACTIVE and i not in waiting and rows[i][2] is None]
        assert not stuck, f"photos without a message, a batch or the sweep: {stuck}"

    def teardown(self) -> None:
        """Deliver everything (the paused worker first, then every message, then the sweep) until nothing is left:
        every photo must end done, rejected or failed (or wait for a model while none is active)."""
        try:
            if self.paused is not None:
                self.second_worker_goes_on()
            self.leases_run_out()  # every worker that claimed a photo is gone
            for _ in range(8):
                for _ in range(200):
                    if not self.world.messages:
                        break
                    msg = self.world.messages.pop(0)
                    self._run(msg, fused=True)  # a worker on every queue: a claimed batch goes through in one call
                    if self.world.messages and self.world.messages[-1][1] == msg[1] and \
                            self.world.messages[-1][0][0] == msg[0][0]:
                        self.leases_run_out()  # Claimed: every claim now belongs to a worker that is gone
                assert not self.world.messages, f"messages that never end: {self.world.messages[:5]}"
                self.sweep()
                if not self.world.messages:
                    break
            from shared.modelops.versions import active_version

            with session_scope() as s:
                active = active_version(s) is not None
                rows = s.execute(select(Image.id, Image.status).where(Image.id.in_(self._ours()))).all()
            stuck = [(i, st_) for i, st_ in rows if st_ not in SETTLED and (active or st_ != "awaiting_model")]
            assert not stuck, f"photos without a way forward: {stuck}"
            self.the_rules_of_a_photos_life_hold()
        finally:
            if self.paused is not None:
                self.paused[1].resume.set()


_seeds = itertools.count(1)


def test_photo_lifecycle_state_machine(world):
    PhotoLife.world = world
    _moves.clear()
    run_state_machine_as_test(PhotoLife, settings=settings(
        max_examples=EXAMPLES, stateful_step_count=10, deadline=None, derandomize=True, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    rows = {(s.value if s else None, e.value, t.value) for s, e, t in photos.TRANSITIONS}
    print(f"\n{len(set(_moves) & rows)} of the {len(rows)} transitions taken, {sum(_moves.values())} moves:")
    for row in sorted(rows, key=str):
        print(f"  {row[0] or '(new)':<16}{row[1]:<17}{row[2]:<16}{_moves.get(row, 0)}")


def test_the_table_is_in_the_docstring_and_move_refuses_any_other_move():
    assert photos.table_text() in photos.__doc__
    assert "done            rescore          scoring" in photos.table_text()
    image = Image(id=7, status=ImageStatus.rejected.value)
    with pytest.raises(photos.IllegalTransition, match="photo 7: score may not move it from rejected to done"):
        photos.move(image, ImageStatus.done, photos.Event.score)
    assert image.status == ImageStatus.rejected.value
    # Only rejected is final; every other state has a way out. A done photo leaves it when someone re-scores it, or
    # when a trained model is activated and the gallery model alone had ranked it (the sweep re-scores it).
    sources = {s for s, _, _ in photos.TRANSITIONS}
    assert set(ImageStatus) - sources == {ImageStatus.rejected}
    assert {e for s, e, _ in photos.TRANSITIONS if s == ImageStatus.done} == {photos.Event.rescore,
                                                                             photos.Event.model_activated}


def _upload(world: World, case_id: int | None, n: int) -> tuple[int, list[int]]:
    from web.uploads import store_images, validate_files

    with session_scope() as s:
        case = s.get(Case, case_id) if case_id else Case(owner_id=world.owner_id, patient_ref="PT-LATE", sex="unknown")
        s.add(case)
        s.flush()
        decoded = validate_files([(f"{k}.png", _photo(next(_seeds))) for k in range(n)])
        return case.id, [i.id for i in store_images(s, case, decoded, world.owner_id, None)]


def test_a_late_score_leaves_a_cancelled_photo_cancelled_and_a_deleted_one_unlogged(world, caplog, monkeypatch):
    """An infer batch scores three photos; during its forward pass an administrator cancels one and another's case
    is deleted. The batch writes the one photo still waiting for its scores; the cancelled photo stays cancelled,
    without a result, and neither is logged as done."""
    from shared.lifecycle import delete_case
    from shared.modelops import registry
    from worker import pipeline
    from worker.stages import scoring

    with session_scope() as s:  # no model: the photos stop at awaiting_model, with their crops
        s.execute(update(ModelVersion).where(ModelVersion.status == "active").values(status="retired"))
    case_id, (first, cancelled) = _upload(world, None, 2)
    other_case, (deleted,) = _upload(world, None, 1)
    world.messages.clear()
    _local.plan = Plan("w-one", fused=True)
    try:
        assert pipeline.detect(first) is None  # one batch: detected, aligned, waiting for a model
    finally:
        _local.plan = None
    with session_scope() as s:
        registry.activate(s, s.get(ModelVersion, world.models[0]))
    pipeline.sweep(lambda i: None, lambda i: None)  # wakes them: waiting for scoring

    forward_pass_done, go_on = threading.Event(), threading.Event()
    write = scoring.write_scores_many

    def late_write(*args, **kwargs):  # the scores are computed; the write waits while the others act
        forward_pass_done.set()
        go_on.wait(60)
        return write(*args, **kwargs)

    monkeypatch.setattr(scoring, "write_scores_many", late_write)
    box: dict = {}

    def score() -> None:
        _local.plan = Plan("w-two")
        box["out"] = pipeline.infer(first)

    thread = threading.Thread(target=score)
    caplog.set_level("INFO", logger="worker.pipeline")
    caplog.set_level("INFO", logger="shared.photos")
    thread.start()
    assert forward_pass_done.wait(60), "the infer batch did not score"
    with session_scope() as s:
        assert s.get(Image, cancelled).stage_times.get("batched_with") == first  # in the batch
        image = s.get(Image, cancelled, with_for_update=True)
        photos.cancel(image)
    with session_scope() as s:
        delete_case(s, get_storage(), s.get(Case, other_case), None, "deleted while scored")
    go_on.set()
    thread.join(60)
    assert box["out"] == first
    with session_scope() as s:
        rows = {i.id: i for i in s.scalars(select(Image).where(Image.id.in_([first, cancelled, deleted])))}
        results = set(s.scalars(select(Result.image_id).where(Result.image_id.in_([first, cancelled, deleted]))))
    assert rows[first].status == "done" and rows[cancelled].status == "rejected" and deleted not in rows
    assert rows[cancelled].reason == "processing was cancelled by an administrator"
    assert results == {first}
    log = caplog.text
    assert f"image={first} state=done" in log
    assert f"image={cancelled} state=done" not in log and f"image={deleted} state=done" not in log
    assert f"image={cancelled} state=skipped by=score expected=scoring found=rejected" in log
    assert f"image={deleted} state=skipped by=score expected=scoring found=deleted" in log
    with session_scope() as s:
        delete_case(s, get_storage(), s.get(Case, case_id), None, "test over")

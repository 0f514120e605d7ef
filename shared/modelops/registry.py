"""Model versions: register checkpoints, activate one, and load the active one once per process."""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
from sqlalchemy import update
from sqlalchemy.orm import Session

from shared.ml.members.model import GestaltModel
from shared.ml.runtime.device import resolve_device
from shared.ml.train.checkpoint import load_checkpoint, save_checkpoint
from shared.modelops.versions import ModelNotFound, active_version, find_version, is_gallery  # noqa: F401 - the lifecycle's lookups
from shared.models import ModelStatus, ModelVersion
from shared.storage import Storage, checkpoint_key, sha256_hex

logger = logging.getLogger(__name__)


def upsert_syndromes(session: Session, names: list[str]) -> list[dict]:
    """Syndrome rows for ``names`` (names, created when missing, or catalogue IDs such as ``OMIM:122470``),
    as the model's class list."""
    from shared.catalog import syndromes_for_labels

    return syndromes_for_labels(session, names)


def register_model(session: Session, storage: Storage, model: GestaltModel, metrics: dict, name: str | None = None,
                   extra: dict | None = None, config: dict | None = None) -> ModelVersion:
    """Store the checkpoint in the object store and add a ``candidate`` model version.

    Args:
        extra: kept in the checkpoint only (e.g. training subjects and image hashes).
        config: small settings kept on the version row too (e.g. the base feature set's key).
    """
    data = save_checkpoint(model, metrics, extra)
    digest = sha256_hex(data)
    name = name or datetime.now(UTC).strftime("m%Y%m%d-%H%M%S")
    key = storage.put(checkpoint_key(name, digest), data)
    version = ModelVersion(
        name=name, arch=model.backbone, config={**model.config, **(config or {})},
        classes=upsert_syndromes(session, model.class_names), checkpoint_key=key, checkpoint_sha256=digest,
        metrics=metrics, status=ModelStatus.candidate.value)
    session.add(version)
    session.flush()
    logger.info("model=%s state=registered id=%d key=%s", name, version.id, key)
    return version


def activate(session: Session, version: ModelVersion) -> None:
    """Make ``version`` the active model; the previous one is retired. Commit, then wake waiting images."""
    if version.status == ModelStatus.active.value:
        return
    session.execute(update(ModelVersion).where(ModelVersion.status == ModelStatus.active.value)
                    .values(status=ModelStatus.retired.value))
    session.flush()
    version.status = ModelStatus.active.value
    version.activated_at = datetime.now(UTC)
    session.flush()
    logger.info("model=%s state=activated id=%d", version.name, version.id)


@dataclass
class LoadedModel:
    version_id: int
    name: str
    classes: list[dict]
    model: GestaltModel

    @property
    def inputs(self) -> tuple[str, ...]:
        """The stored crops a scoring pass reads."""
        return self.model.inputs


class ModelCache:
    """The active model of one worker process.

    The database is asked which version is active at most every ``check_seconds``;
    a version is downloaded and loaded once, and replaced when another is activated.
    """

    def __init__(self, check_seconds: float = 5.0, device: str = "auto", compile: bool = False,
                 runtime: str = "eager", runtime_cache: str | None = None, gallery_fallback: bool = False):
        """
        Args:
            compile: run the loaded model through ``torch.compile`` (see ``prepare_for_inference``).
            runtime: the CPU runtime of the loaded model (``GESTALT_CPU_RUNTIME``; see ``prepare_for_inference``).
            runtime_cache: where that runtime's exported models are kept (None: in memory).
            gallery_fallback: while no model is active, register and activate the gallery model
                (:func:`ensure_gallery_model`; ``GESTALT_GALLERY_MODEL``).
        """
        self.gallery_fallback = gallery_fallback
        self.check_seconds = check_seconds
        self.device = resolve_device(device)
        self.compile = compile
        self.runtime = runtime
        self.runtime_cache = runtime_cache
        self._loaded: LoadedModel | None = None
        self._active_id: int | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()

    @property
    def loaded_name(self) -> str | None:
        return self._loaded.name if self._loaded else None

    def active(self, session: Session, storage: Storage) -> LoadedModel | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= self.check_seconds or self._active_id is None:
                version = active_version(session)
                if version is None and self.gallery_fallback:
                    version = ensure_gallery_model(session, storage)
                self._active_id = version.id if version else None
                self._checked_at = now
                if version is not None and (self._loaded is None or self._loaded.version_id != version.id):
                    self._loaded = self._load(version, storage)
            if self._active_id is None:
                return None
            return self._loaded

    def _load(self, version: ModelVersion, storage: Storage) -> LoadedModel:
        data = storage.get(version.checkpoint_key)
        if sha256_hex(data) != version.checkpoint_sha256:
            raise ValueError(f"checkpoint of model {version.name} does not match its sha256")
        model, _ = load_checkpoint(data, self.device, compile=self.compile, runtime=self.runtime,
                                   cache_dir=self.runtime_cache)
        casia = model.member("casia")
        logger.info("model=%s state=loaded id=%d device=%s members=%s runtime=%s", version.name, version.id,
                    self.device, ",".join(m.kind for m in model.members) or "none",
                    casia.net.runner.runtime if casia is not None and casia.net.runner else "eager")
        return LoadedModel(version.id, version.name, list(version.classes), model)


GALLERY_MODEL = "gallery"
# One process registers the gallery model at a time, cluster-wide (a PostgreSQL transaction-level advisory lock).
_GALLERY_LOCK = 0x67616C6C  # "gall"


def ensure_gallery_model(session: Session, storage: Storage) -> ModelVersion | None:
    """The gallery model, registered (once) and made active when no model is: a clinic's photos are then scored
    before any model is trained (the encoder's descriptors, the gallery's nearest patients and syndromes), and the
    nightly run trains the first model once enough patients are diagnosed. Returns the active version, or None when
    the identity encoder's weights are missing (photos then wait for a model, as before).
    Commit follows in the caller's transaction."""
    from sqlalchemy import select, text

    from shared.ml.formats.weights import WeightsMissing
    from shared.ml.members.model import gallery_model
    from shared.ml.nets.encoder import CONVERTED_SHA256, load_state_dict
    from shared.ml.preprocess.regions import DEFAULT_REGIONS

    session.execute(text("select pg_advisory_xact_lock(:k)"), {"k": _GALLERY_LOCK})
    current = active_version(session)
    if current is not None:
        return current
    try:
        load_state_dict()  # the encoder must be there for the gallery model to score anything
    except WeightsMissing as exc:
        logger.warning("model=%s state=unavailable reason=%r", GALLERY_MODEL, str(exc))
        return None
    version = session.scalars(select(ModelVersion).where(ModelVersion.name == GALLERY_MODEL)).first()
    if version is None:
        model = gallery_model(CONVERTED_SHA256, DEFAULT_REGIONS)
        version = register_model(session, storage, model, {"gallery": "no trained member: ranked by the gallery"},
                                 name=GALLERY_MODEL)
    activate(session, version)
    logger.info("model=%s state=active reason=no_trained_model", GALLERY_MODEL)
    return version


def gallery_ranked(session: Session, limit: int = 500) -> list:
    """Finished photos that only the gallery model has ranked, locked, while a trained model is active (the sweep
    scores them with it); at most ``limit`` per sweep."""
    from sqlalchemy import exists, select

    from shared.models import Image, ImageStatus, Result

    active = active_version(session)
    if active is None or is_gallery(active):
        return []
    galleries = select(ModelVersion.id).where(ModelVersion.config["backbone"].astext == "none")
    ranked_by_gallery = exists().where(Result.image_id == Image.id, Result.model_version_id.in_(galleries))
    ranked_by_active = exists().where(Result.image_id == Image.id, Result.model_version_id == active.id)
    return list(session.scalars(select(Image).where(Image.status == ImageStatus.done.value, ranked_by_gallery,
                                                    ~ranked_by_active).order_by(Image.id).limit(limit)
                                .with_for_update(skip_locked=True)))


def set_torch_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)

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

from shared.ml.nets.ensemble import RegionalEnsemble
from shared.ml.runtime.device import resolve_device
from shared.ml.train.checkpoint import load_checkpoint, save_checkpoint
from shared.modelops.versions import ModelNotFound, active_version, find_version  # noqa: F401 - the lifecycle's lookups
from shared.models import ModelStatus, ModelVersion
from shared.storage import Storage, checkpoint_key, sha256_hex

logger = logging.getLogger(__name__)


def upsert_syndromes(session: Session, names: list[str]) -> list[dict]:
    """Syndrome rows for ``names`` (names, created when missing, or catalogue IDs such as ``OMIM:122470``),
    as the model's class list."""
    from shared.catalog import syndromes_for_labels

    return syndromes_for_labels(session, names)


def register_model(session: Session, storage: Storage, model: RegionalEnsemble, class_names: list[str],
                   metrics: dict, name: str | None = None, extra: dict | None = None,
                   config: dict | None = None) -> ModelVersion:
    """Store the checkpoint in the object store and add a ``candidate`` model version.

    Args:
        extra: kept in the checkpoint only (e.g. training subjects and image hashes).
        config: small settings kept on the version row too (e.g. the base feature set's key).
    """
    from shared.ml.train.heads import backbone_sha

    data = save_checkpoint(model, class_names, metrics, extra)
    digest = sha256_hex(data)
    name = name or datetime.now(UTC).strftime("m%Y%m%d-%H%M%S")
    key = storage.put(checkpoint_key(name, digest), data)
    version = ModelVersion(
        name=name, arch=model.arch, config={**model.config, "backbone_sha": backbone_sha(model), **(config or {})},
        classes=upsert_syndromes(session, class_names), checkpoint_key=key, checkpoint_sha256=digest,
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
    model: RegionalEnsemble
    backbone_sha: str

    @property
    def regions(self) -> tuple[str, ...]:
        return self.model.regions


class ModelCache:
    """The active model of one worker process.

    The database is asked which version is active at most every ``check_seconds``;
    a version is downloaded and loaded once, and replaced when another is activated.
    """

    def __init__(self, check_seconds: float = 5.0, device: str = "auto", compile: bool = False,
                 runtime: str = "eager", runtime_cache: str | None = None):
        """
        Args:
            compile: run the loaded model through ``torch.compile`` (see ``prepare_for_inference``).
            runtime: the CPU runtime of the loaded model (``GESTALT_CPU_RUNTIME``; see ``prepare_for_inference``).
            runtime_cache: where that runtime's exported models are kept (None: in memory).
        """
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
        logger.info("model=%s state=loaded id=%d device=%s runtime=%s", version.name, version.id, self.device,
                    model.runner.runtime if model.runner else "compile" if model.compiled else "eager")
        from shared.ml.train.heads import backbone_sha

        return LoadedModel(version.id, version.name, list(version.classes), model,
                           version.config.get("backbone_sha") or backbone_sha(model))


def set_torch_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)

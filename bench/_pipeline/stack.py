"""The stack under the benchmark: the engines, the worker and web processes, and a registered model."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from shared.stack import EmbeddedEngines, Ports, Process, free_port
from tests.conftest import TEST_SETTINGS

from .photos import FACE_ENV, known_face

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "bench" / "pipeline.py"


def random_production_env(tmp: Path) -> dict[str, str]:
    """RetinaFace-R50 and FAN with random weights, unless the real files are present."""
    from shared.ml.formats.weights import WEIGHTS_BY_KEY, locate

    env = {"GESTALT_DETECTOR": "retinaface", "GESTALT_LANDMARKER": "fan"}
    if locate(WEIGHTS_BY_KEY["retinaface_resnet50"]) and locate(WEIGHTS_BY_KEY["fan"]):
        return env
    sys.path.insert(0, str(ROOT / "bench"))
    from preprocess import random_production_weights

    random_production_weights(tmp / "torch" / "hub" / "checkpoints")
    os.environ.pop("GESTALT_WEIGHTS_DIR", None)
    return {**env, "TORCH_HOME": str(tmp / "torch"), "GESTALT_WEIGHTS_VERIFY": "0"}


def start_engines(models: str, tmp: Path) -> EmbeddedEngines:
    """The embedded engines on free ports, this process's settings pointing at them, the schema migrated."""
    engines = EmbeddedEngines(tmp, Ports.free())
    engines.start()
    os.environ.update(engines.env)
    os.environ.update(TEST_SETTINGS)
    os.environ["GESTALT_MAX_UPLOAD_MB"] = "20"
    # One benchmark user uploads every photo: thousands in an hour on a GPU (bench/gpu.sh), past the per-user limit
    # (GESTALT_PHOTO_RATE_LIMIT, 200 per hour) that protects a clinic's portal.
    os.environ["GESTALT_PHOTO_RATE_LIMIT"] = "1000000 per hour"
    if models == "random-production":
        os.environ.update(random_production_env(tmp))
    from shared import migrate
    from shared.config import reload_settings

    reload_settings()
    migrate.upgrade()
    return engines


def share_known_face(models: str, srcs: list) -> None:
    """The stand-ins' face, for the worker processes started after this (their environment carries it)."""
    if models != "real":
        os.environ[FACE_ENV] = json.dumps(known_face(srcs[0]))


def worker_processes(args, tmp: Path, env: dict[str, str]) -> list[Process]:
    """On the CPU one worker on every queue; with ``--device cuda`` a GPU worker on the pipeline's queues
    and a CPU worker on the default queue. Stand-ins run in this script's ``--serve-worker`` mode."""
    pipeline_env = {**env, "GESTALT_DEVICE": args.device}
    if args.device != "cpu":
        pipeline_env["GESTALT_TORCH_THREADS"] = "0"
    if args.models == "real":
        launcher = [sys.executable, "-m", "shared.cli", "worker"]
    else:
        launcher = [sys.executable, str(SCRIPT), "--serve-worker", args.models]
    if args.device == "cpu":
        return [Process("worker", [*launcher, "-Q", "detect,align,infer,default", "-c", str(args.concurrency),
                                   "-n", "bench@%h"], pipeline_env, tmp / "worker.log", cwd=ROOT)]
    return [Process("gpu-worker", [*launcher, "-Q", "detect,align,infer", "-c", str(args.gpu_procs),
                                   "-n", "gpu@%h"], pipeline_env, tmp / "gpu-worker.log", cwd=ROOT),
            Process("cpu-worker", [sys.executable, "-m", "shared.cli", "worker", "-Q", "default", "-c", "2",
                                   "-n", "cpu@%h"], env, tmp / "cpu-worker.log", cwd=ROOT)]


def web_process(args, tmp: Path, env: dict[str, str]) -> tuple[Process, int]:
    """The portal on a free port."""
    port = free_port()
    web = Process("web", [sys.executable, "-m", "shared.cli", "web", "--port", str(port), "--workers",
                          str(args.web_workers)], env, tmp / "web.log", cwd=ROOT)
    return web, port


@dataclass
class Registered:
    """The benchmark's model, registered and active: its checkpoint (the bound loads it the way the workers do)."""

    checkpoint: bytes
    width: float | None  # the CASIA-Nets' width; None for a model of encoder members

    @property
    def label(self) -> str:
        return f"CASIA-Nets width {self.width}" if self.width is not None else "encoder members"


def members_model(classes: int, seed: int = 0):
    """The kind of model ``gestalt train`` makes by default: a head on the encoder's stage features for each of the
    four regions' cuts, the identity member's head on its descriptor, a logistic stack, and the gallery and OOD
    reference on every descriptor. Random values, with RBF heads at the largest size training picks
    (``MAX_COMPONENTS``) and an OOD reference of two photos per class: the speed does not depend on the values."""
    import numpy as np

    from shared.ml.members.encoder_regions import EncoderRegions
    from shared.ml.members.gallery import unit_concat
    from shared.ml.members.identity import (
        MAX_COMPONENTS,
        MEMBER,
        IdentityHead,
        IdentityMember,
        build_ood_reference,
    )
    from shared.ml.members.model import ENCODER, GestaltModel
    from shared.ml.members.stack import Stack
    from shared.ml.nets.encoder import CONVERTED_SHA256
    from shared.ml.preprocess.regions import DEFAULT_REGIONS
    from shared.ml.train.refit import FLIP_DESCRIPTORS

    rng = np.random.default_rng(seed)
    f32 = np.float32

    def head(dim: int) -> IdentityHead:
        m = MAX_COMPONENTS
        return IdentityHead("rbf", rng.normal(size=dim).astype(f32), np.ones(dim, f32),
                            rng.normal(0, 0.05, (classes, m)).astype(f32), np.zeros(classes, f32), 1.0 / dim,
                            rng.normal(size=(m, dim)).astype(f32), (rng.normal(size=(m, m)) / m ** 0.5).astype(f32))

    regions = tuple(DEFAULT_REGIONS)
    names = (*regions, MEMBER)
    members = [EncoderRegions(regions, {r: head(256) for r in regions}, CONVERTED_SHA256, FLIP_DESCRIPTORS),
               IdentityMember(head(128), CONVERTED_SHA256, {}, FLIP_DESCRIPTORS)]
    model = GestaltModel([f"syndrome-{i:03d}" for i in range(classes)], members,
                         Stack(names, np.full(len(names), 1 / len(names)), np.zeros(classes)), ENCODER,
                         descriptor_names=names, encoder_sha=CONVERTED_SHA256, flip=FLIP_DESCRIPTORS,
                         gallery_names=(MEMBER, *regions))
    space = unit_concat([rng.normal(size=(3 * classes, 128 if n == MEMBER else 256)) for n in model.gallery_names])
    model.ood = build_ood_reference(space[:2 * classes], space[2 * classes:], seed)
    return model


def register(args) -> Registered:
    """The benchmark's model with random weights (speed does not depend on them), registered and active: a model of
    encoder members (``--kind members``, what ``gestalt train`` makes by default) or CASIA-Nets (``--kind casia``,
    and always with the null models' stand-ins)."""
    import torch

    from shared.db import session_scope
    from shared.ml.members.casia import casia_only
    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.preprocess.regions import DEFAULT_REGIONS
    from shared.modelops import registry
    from shared.storage import get_storage

    torch.manual_seed(0)
    kind = "casia" if args.models == "null" else args.kind
    width = None
    if kind == "members":
        model = members_model(args.classes)
    else:
        width = 0.125 if args.models == "null" else args.width
        model = casia_only(RegionalEnsemble(DEFAULT_REGIONS, args.classes, width=width).eval(),
                           [f"syndrome-{i:03d}" for i in range(args.classes)])
    with session_scope() as s:
        version = registry.register_model(s, get_storage(), model, {"note": "benchmark, random weights"},
                                          name="bench")
        registry.activate(s, version)
        key = version.checkpoint_key
    return Registered(get_storage().get(key), width)

"""The stack under the benchmark: the engines, the worker and web processes, and a registered ensemble."""
from __future__ import annotations

import json
import os
import sys
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


def register(args):
    """A CASIA-Net ensemble with random weights (speed does not depend on them), registered and active."""
    import torch

    from shared.db import session_scope
    from shared.ml.members.casia import casia_only
    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.preprocess.regions import DEFAULT_REGIONS
    from shared.storage import get_storage

    try:
        from shared.modelops import registry
    except ImportError:  # before the model operations moved
        from shared.ml import registry

    torch.manual_seed(0)
    width = 0.125 if args.models == "null" else args.width
    model = RegionalEnsemble(DEFAULT_REGIONS, args.classes, width=width).eval()
    with session_scope() as s:
        version = registry.register_model(s, get_storage(),
                                          casia_only(model, [f"syndrome-{i:03d}" for i in range(args.classes)]),
                                          {"note": "benchmark, random weights"}, name="bench")
        registry.activate(s, version)
    return model

"""The networks alone on pre-decoded photos, in the same run: the bound the pipeline's throughput is set against.

Detector, landmarks and the registered model's members (loaded as the workers load them: the same CPU runtime,
the encoder through its runner, a worker's batch of photos per pass), one process per core as the workers run (or
``--gpu-procs`` on the GPU), and the model alone (all cores in one process).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .photos import FACE_ENV, distinct_jpegs


def _inputs(names: tuple[str, ...], n: int) -> dict[str, np.ndarray]:
    """Random crops of ``n`` faces by the names a model reads: grey region crops, the face chip and the colour cuts
    (the networks' speed does not depend on the pixels)."""
    from shared.ml.members.identity import CHIP_REGION
    from shared.ml.preprocess.regions import CROP_SIZE, CUT_PREFIX, CUT_SIZE

    rng = np.random.default_rng(0)
    return {name: rng.integers(0, 256, (n, CUT_SIZE, CUT_SIZE, 3) if name == CHIP_REGION or name.startswith(CUT_PREFIX)
                               else (n, CROP_SIZE, CROP_SIZE), np.uint8) for name in names}


def _load_like_workers(checkpoint: bytes, device: str):
    """The model and the encoder's runner (None when no member reads through it), loaded as a pipeline worker
    process loads them: the settings' CPU runtime, precision and runtime cache."""
    from shared.config import get_settings
    from shared.ml.nets.encoder import load_encoder
    from shared.ml.nets.encoder_runner import EncoderRunner
    from shared.ml.runtime.device import resolve_device
    from shared.ml.train.checkpoint import load_checkpoint

    s = get_settings()
    dev = resolve_device(device)
    model, _ = load_checkpoint(checkpoint, dev, compile=s.infer_compile, runtime=s.cpu_runtime,
                               cache_dir=str(s.runtime_cache))
    runner = None
    if model.needs_encoder:
        runner = EncoderRunner(load_encoder(dev, verify=s.weights_verify, runtime=s.cpu_runtime,
                                            cache_dir=s.runtime_cache), s.infer_precision)
    return model, runner


def _networks_alone(conn, device: str, blobs: list[bytes], box_face: dict | None, checkpoint: bytes,
                    threads: int, batch: int) -> None:
    """One process's photos/s of detector + landmarks + the model's members (spawned: a clean torch), the model
    loaded as the workers load it and its members run on ``batch`` photos at a time, as a worker's batch."""
    import torch

    from shared.config import get_settings
    from shared.ml.members.model import predict
    from shared.ml.preprocess.imaging import decode_stored
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.preprocess.regions import DEFAULT_REGIONS

    if threads:
        torch.set_num_threads(threads)
    settings = get_settings()
    pre = Preprocessor(settings.min_face_confidence, DEFAULT_REGIONS, settings.detector_backend,
                       settings.landmark_backend, device, settings.weights_verify)
    model, runner = _load_like_workers(checkpoint, device)
    rgbs = [decode_stored(b) for b in blobs]
    crops = _inputs(model.inputs, batch)

    def landmarks(rgb: np.ndarray) -> None:
        faces = pre.detector.detect_batch([rgb])[0]
        if box_face is not None or not faces:
            s = np.array([rgb.shape[1], rgb.shape[0]], np.float64)
            box = tuple((np.array(box_face["box"]).reshape(2, 2) * s).ravel()) if box_face else \
                (0.3 * s[0], 0.3 * s[1], 0.7 * s[0], 0.7 * s[1])
        else:
            box = max(faces, key=lambda f: f.area).box
        pre.mesh.landmarks_batch([rgb], [box])

    def members(n: int) -> None:
        predict(model, {k: v[:n] for k, v in crops.items()}, runner, precision=settings.infer_precision,
                flip_tta=settings.infer_flip_tta)

    landmarks(rgbs[0])
    members(batch)
    conn.send("ready")
    conn.recv()  # start together
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(rgbs), batch):
        part = rgbs[start:start + batch]
        for rgb in part:
            landmarks(rgb)
        members(len(part))
    conn.send((len(rgbs) / (time.perf_counter() - t0), (time.process_time() - c0) / len(rgbs)))
    pre.close()


def _in_processes(args, blobs: list[bytes], face: dict | None, checkpoint: bytes,
                  procs: int) -> list[tuple[float, float]]:
    """(photos/s, CPU seconds per photo) of each of ``procs`` spawned processes, started together."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    pipes, children = [], []
    for _ in range(procs):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_networks_alone, args=(child, args.device, blobs, face, checkpoint,
                                                      1 if args.device == "cpu" else 0, _batch()))
        p.start()
        pipes.append(parent)
        children.append(p)
    for c in pipes:
        assert c.recv() == "ready"
    for c in pipes:
        c.send("go")
    answers = [c.recv() for c in pipes]
    for p in children:
        p.join()
    return answers


def _batch() -> int:
    from shared.config import get_settings

    return get_settings().detect_batch


def network_bounds(args, srcs: list[np.ndarray], model) -> dict[str, float]:
    """Photos/s of the networks alone (``model``: the registered model, :class:`.stack.Registered`): one process per
    core as the workers run, and the model alone on every core."""
    import torch

    from shared.config import get_settings
    from shared.ml.members.model import predict

    cores = os.cpu_count() or 2
    procs = cores if args.device == "cpu" else args.gpu_procs
    blobs = distinct_jpegs(srcs, max(2 * _batch(), min(40, args.uploads // procs)), offset=10**6)
    face = json.loads(os.environ[FACE_ENV]) if args.models != "real" else None
    answers = _in_processes(args, blobs, face, model.checkpoint, procs)
    rate = sum(r for r, _ in answers)
    cpu_ms = 1000 * sum(c for _, c in answers) / len(answers)
    out = {f"networks alone: detector + landmarks + {model.label}, {procs} process(es)": rate}
    if args.device == "cpu":
        out[f"networks alone, CPU-bound: {cores} cores / {cpu_ms:.0f} CPU ms per photo"] = cores / (cpu_ms / 1000)
        torch.set_num_threads(cores)
        loaded, runner = _load_like_workers(model.checkpoint, args.device)
        crops = _inputs(loaded.inputs, 64)
        s = get_settings()
        predict(loaded, {k: v[:8] for k, v in crops.items()}, runner, precision=s.infer_precision)
        t0 = time.monotonic()
        predict(loaded, crops, runner, precision=s.infer_precision, flip_tta=s.infer_flip_tta)
        out[f"model alone ({model.label}, 64 faces, {cores} threads)"] = 64 / (time.monotonic() - t0)
    return out

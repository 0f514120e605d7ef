"""The networks alone on pre-decoded photos, in the same run: the bound the pipeline's throughput is set against.

Detector, landmarks and the regional CNNs, one process per core as the workers run (or
``--gpu-procs`` on the GPU), and the old CNN-only bound (the ensemble alone, all cores in one process).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

from .photos import FACE_ENV, distinct_jpegs


def _networks_alone(conn, models: str, device: str, blobs: list[bytes], box_face: dict | None, width: float,
                    classes: int, threads: int) -> None:
    """One process's photos/s of detector + landmarks + regional CNNs (spawned: a clean torch)."""
    import torch

    from shared.config import get_settings
    from shared.ml.nets.ensemble import RegionalEnsemble, predict_regions, prepare_for_inference
    from shared.ml.preprocess.imaging import decode_stored
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.preprocess.regions import CROP_SIZE, DEFAULT_REGIONS
    from shared.ml.runtime.device import resolve_device

    if threads:
        torch.set_num_threads(threads)
    settings = get_settings()
    pre = Preprocessor(settings.min_face_confidence, DEFAULT_REGIONS, settings.detector_backend,
                       settings.landmark_backend, device, settings.weights_verify)
    torch.manual_seed(0)
    model = prepare_for_inference(RegionalEnsemble(DEFAULT_REGIONS, classes, width=width), resolve_device(device))
    rgbs = [decode_stored(b) for b in blobs]
    crops = np.random.default_rng(0).integers(0, 255, (1, len(DEFAULT_REGIONS), CROP_SIZE, CROP_SIZE), np.uint8)

    def one(rgb: np.ndarray) -> None:
        faces = pre.detector.detect_batch([rgb])[0]
        if box_face is not None or not faces:
            s = np.array([rgb.shape[1], rgb.shape[0]], np.float64)
            box = tuple((np.array(box_face["box"]).reshape(2, 2) * s).ravel()) if box_face else \
                (0.3 * s[0], 0.3 * s[1], 0.7 * s[0], 0.7 * s[1])
        else:
            box = max(faces, key=lambda f: f.area).box
        pre.mesh.landmarks_batch([rgb], [box])
        predict_regions(model, crops, precision=settings.infer_precision)

    one(rgbs[0])
    conn.send("ready")
    conn.recv()  # start together
    t0, c0 = time.perf_counter(), time.process_time()
    for rgb in rgbs:
        one(rgb)
    conn.send((len(rgbs) / (time.perf_counter() - t0), (time.process_time() - c0) / len(rgbs)))
    pre.close()


def _in_processes(args, blobs: list[bytes], face: dict | None, width: float, procs: int) -> list[tuple[float, float]]:
    """(photos/s, CPU seconds per photo) of each of ``procs`` spawned processes, started together."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    pipes, children = [], []
    for _ in range(procs):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_networks_alone, args=(child, args.models, args.device, blobs, face, width,
                                                      args.classes, 1 if args.device == "cpu" else 0))
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


def network_bounds(args, srcs: list[np.ndarray], model) -> dict[str, float]:
    """Photos/s of the networks alone: one process per core as the workers run, and the CNN-only figure."""
    import torch

    from shared.ml.nets.ensemble import predict_regions
    from shared.ml.preprocess.regions import DEFAULT_REGIONS

    cores = os.cpu_count() or 2
    procs = cores if args.device == "cpu" else args.gpu_procs
    blobs = distinct_jpegs(srcs, max(2, min(40, args.uploads // procs)), offset=10**6)
    face = json.loads(os.environ[FACE_ENV]) if args.models != "real" else None
    answers = _in_processes(args, blobs, face, model.width, procs)
    rate = sum(r for r, _ in answers)
    cpu_ms = 1000 * sum(c for _, c in answers) / len(answers)
    out = {f"networks alone: detector + landmarks + CNNs, {procs} process(es)": rate}
    if args.device == "cpu":
        out[f"networks alone, CPU-bound: {cores} cores / {cpu_ms:.0f} CPU ms per photo"] = cores / (cpu_ms / 1000)
    if args.device == "cpu":
        torch.set_num_threads(cores)
        crops = np.random.default_rng(0).integers(0, 255, (64, len(DEFAULT_REGIONS), 100, 100), dtype=np.uint8)
        predict_regions(model, crops[:32], batch_size=32)
        t0 = time.monotonic()
        predict_regions(model, crops, batch_size=32)
        out[f"CNN-only bound (ensemble alone, {cores} threads)"] = len(crops) / (time.monotonic() - t0)
    return out

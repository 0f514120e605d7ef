"""End-to-end pipeline benchmark on the real stack.

Starts the embedded engines, real Celery workers and the portal, registers a CASIA-Net
ensemble (random weights: speed does not depend on them), then prints:

1. per-stage latency p50/p95 for single uploads with warm workers (``--single``);
2. sustained throughput over N uploads, each a distinct ~1 MP JPEG, with the CPU time of every
   process of the stack (web, workers, PostgreSQL, Redis, the object store; from ``psutil``)
   and the database transactions, each divided by photos;
3. for real models, the bound set by the networks alone in the same run: detector, landmarks
   and the regional CNNs on pre-decoded photos, one process per core (as the workers run),
   and the old CNN-only bound (the ensemble alone, all cores in one process).

``--models`` chooses what runs where the networks are:

* ``real``: the worker's own backends (the settings' detector and landmarks; offline ones
  without production weights) and the registered ensemble.
* ``null`` (``--null-models``): stand-ins that cost nothing for the detector, the landmark
  model and the regional CNNs. They answer with the benchmark photo's known face, so
  everything outside the networks (decode, levelling, alignment, quality gate, crops,
  measurements, every transaction and object operation, the queues) runs as in production.
  The figure is the orchestration ceiling and the CPU per photo outside the networks.
* ``random-production``: RetinaFace-R50 and FAN with random weights run at full cost, and
  their (meaningless) outputs are replaced by the photo's known face, so a machine without
  the weight files times the production networks end to end (``bench/gpu.sh`` uses it).

The stand-ins are installed only in the worker processes this script starts
(``--serve-worker``), never in production code.

``--device cuda``: the pipeline worker (detect, align, infer) runs on the GPU with
``--gpu-procs`` processes, and a CPU worker takes the default queue.

Usage: python bench/pipeline.py [--models real|null|random-production] [--uploads 100] [--single 15]
       [--classes 300] [--width 1.0] [--concurrency N] [--device cpu|cuda] [--rows FILE.jsonl]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table
from skimage import data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.stack import EmbeddedEngines, Ports, Process, free_port  # noqa: E402
from tests.conftest import TEST_SETTINGS, Portal, new_user, wait_http  # noqa: E402

console = Console(width=160)
SHARED_DATA = Path(os.environ.get("GESTALT_SHARED_DATA", ROOT.parent / "shared" / "data"))
# The known face of the stand-ins: box, five points and 68 landmarks, relative to the photo's size.
FACE_ENV = "GESTALT_BENCH_FACE"
MODES = ("real", "null", "random-production")


# ----- photos ---------------------------------------------------------------------------------

def sources(models: str, megapixels: float = 1.0) -> list[np.ndarray]:
    """RGB sources of ~1 MP: the astronaut, plus the shared people photos for real models.

    The stand-ins know one face, so the other modes upload astronaut variants only."""
    side = int(round(1000 * megapixels ** 0.5))
    out = [np.asarray(Image.fromarray(data.astronaut()).resize((side, side)))]
    people = SHARED_DATA / "faces" / "people"
    if models == "real" and people.exists():
        for path in sorted(people.glob("img*.jpg"))[:20]:
            im = Image.open(path).convert("RGB")
            scale = (megapixels * 1e6 / (im.width * im.height)) ** 0.5
            out.append(np.asarray(im.resize((int(im.width * scale), int(im.height * scale)))))
    return out


def distinct_jpegs(srcs: list[np.ndarray], n: int, offset: int = 0) -> list[bytes]:
    """``n`` JPEGs that all differ (a few corner pixels carry the index): no two uploads share a hash."""
    out = []
    for i in range(n):
        rgb = srcs[i % len(srcs)].copy()
        k = i + offset
        rgb[:2, :2] = (k & 255, (k >> 8) & 255, (k >> 16) & 255)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def known_face(rgb: np.ndarray) -> dict:
    """The astronaut's face, found once by the offline backends, relative to the photo's size."""
    from shared.ml.preprocess import Preprocessor

    pre = Preprocessor(detector="mediapipe", landmarker="mediapipe")
    try:
        found = pre.run(rgb)
    finally:
        pre.close()
    h, w = rgb.shape[:2]
    scale = np.array([w, h], np.float64)
    box = np.array(found.face.box).reshape(2, 2) / scale
    return {"box": box.ravel().tolist(), "points": (np.array(found.face.points) / scale).tolist(),
            "landmarks": (found.aligned.landmarks / scale).tolist()}


# ----- stand-ins, installed in the benchmark's worker processes only -----------------------

class KnownFaceDetector:
    """Answers with the known face; ``inner`` (a real network) runs first when given, for its cost."""

    def __init__(self, face: dict, inner=None):
        self.face, self.inner = face, inner
        self.name = inner.name if inner is not None else "bench-null-detector"
        self.weights_sha256 = inner.weights_sha256 if inner is not None else "null"

    def detect_batch(self, images: list[np.ndarray]) -> list:
        from shared.ml.detection import DetectedFace

        if self.inner is not None:
            self.inner.detect_batch(images)
        out = []
        for rgb in images:
            s = np.array([rgb.shape[1], rgb.shape[0]], np.float64)
            box = (np.array(self.face["box"]).reshape(2, 2) * s).ravel()
            points = np.array(self.face["points"]) * s
            out.append([DetectedFace(tuple(float(c) for c in box), 0.99, tuple(map(tuple, points.tolist())))])
        return out

    def detect(self, rgb: np.ndarray) -> list:
        return self.detect_batch([rgb])[0]

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


class KnownFaceLandmarks:
    def __init__(self, face: dict, inner=None):
        self.face, self.inner = face, inner
        self.name = inner.name if inner is not None else "bench-null-landmarks"
        self.weights_sha256 = inner.weights_sha256 if inner is not None else "null"

    def landmarks_batch(self, images: list[np.ndarray], boxes: list[tuple]) -> list:
        if self.inner is not None:
            self.inner.landmarks_batch(images, boxes)
        return [np.array(self.face["landmarks"]) * np.array([rgb.shape[1], rgb.shape[0]], np.float64)
                for rgb in images]

    def landmarks(self, rgb: np.ndarray, box: tuple) -> np.ndarray:
        return self.landmarks_batch([rgb], [box])[0]

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def install_stand_ins(models: str) -> None:
    """Replace the worker's networks in this process (a Celery parent: its forks inherit the patch).

    The preprocessor is built on first use, in the child (CUDA and mediapipe do not survive a fork)."""
    from worker import pipeline

    face = json.loads(os.environ[FACE_ENV])
    if models == "null":
        import torch

        from shared.ml.gestalt import RegionalEnsemble

        def null_forward(self, x):  # N x R x 1 x H x W -> zero logits and features, no arithmetic
            n, r = x.shape[0], len(self.regions)
            feats = getattr(self, "_bench_features", None)
            if feats is None:
                feats = self._bench_features = next(iter(self.nets.values())).num_features
            return torch.zeros(n, r, self.num_classes), torch.zeros(n, r, feats)

        RegionalEnsemble.forward_with_features = null_forward
    built = []

    def preprocessor():
        if not built:
            from shared.config import get_settings
            from shared.ml.preprocess import Preprocessor
            from shared.ml.regions import ALL_REGIONS

            inner = Preprocessor.from_settings(get_settings(), regions=ALL_REGIONS) \
                if models == "random-production" else None
            pre = Preprocessor.__new__(Preprocessor)
            pre.min_confidence = 0.5
            pre.regions = ALL_REGIONS
            pre.detector = KnownFaceDetector(face, inner.detector if inner else None)
            pre.mesh = KnownFaceLandmarks(face, inner.mesh if inner else None)
            built.append(pre)
        return built[0]

    pipeline.preprocessor = preprocessor


def serve_worker(models: str, celery_args: list[str]) -> None:
    from worker.celery_app import app

    install_stand_ins(models)
    app.worker_main(["worker", "--loglevel=INFO", *celery_args])


# ----- CPU accounting -------------------------------------------------------------------------

def tree_cpu(pid: int) -> float:
    """CPU seconds of a process, its live descendants, and the children they reaped."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            pass
    return total


def cpu_snapshot(groups: dict[str, list[Process]]) -> dict[str, float]:
    return {name: sum(tree_cpu(p.popen.pid) for p in procs if p.popen is not None)
            for name, procs in groups.items()}


def transactions() -> int:
    from sqlalchemy import text

    from shared.db import session_scope

    with session_scope() as s:
        return int(s.execute(text("select xact_commit + xact_rollback from pg_stat_database "
                                  "where datname = current_database()")).scalar())


# ----- the run --------------------------------------------------------------------------------

def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-worker":
        serve_worker(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", choices=MODES, default="real")
    ap.add_argument("--null-models", action="store_true", help="the same as --models null")
    ap.add_argument("--uploads", type=int, default=100)
    ap.add_argument("--single", type=int, default=15)
    ap.add_argument("--classes", type=int, default=300)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: the pipeline worker on the GPU")
    ap.add_argument("--gpu-procs", type=int, default=2, help="pipeline worker processes sharing the GPU")
    ap.add_argument("--megapixels", type=float, default=1.0, help="photo size (bench/gpu.sh --cpu-smoke: small)")
    ap.add_argument("--preload", action="store_true",
                    help="queue every upload first, then time the pipeline draining them (the web out of the way)")
    ap.add_argument("--no-bound", action="store_true", help="skip the networks-alone bound (a quick smoke run)")
    ap.add_argument("--web-workers", type=int, default=2)
    ap.add_argument("--upload-threads", type=int, default=4)
    ap.add_argument("--rows", type=Path, default=None, help="append the results as JSON lines (bench/gpu.sh)")
    ap.add_argument("--label", default="", help="a name for this run in the table titles and rows")
    args = ap.parse_args()
    if args.null_models:
        args.models = "null"

    tmp = Path(tempfile.mkdtemp(prefix="gestalt-bench-"))
    engines = EmbeddedEngines(tmp, Ports.free())
    engines.start()
    os.environ.update(engines.env)
    os.environ.update(TEST_SETTINGS)
    os.environ["GESTALT_MAX_UPLOAD_MB"] = "20"
    if args.models == "random-production":
        os.environ.update(random_production_env(tmp))
    from shared import migrate
    from shared.config import reload_settings

    reload_settings()
    migrate.upgrade()
    srcs = sources(args.models, args.megapixels)
    if args.models != "real":
        os.environ[FACE_ENV] = json.dumps(known_face(srcs[0]))
    env = {**os.environ}
    pipeline_env = {**env, "GESTALT_DEVICE": args.device}
    if args.device != "cpu":
        pipeline_env["GESTALT_TORCH_THREADS"] = "0"
    if args.models == "real":
        launcher = [sys.executable, "-m", "shared.cli", "worker"]
    else:
        launcher = [sys.executable, str(Path(__file__).resolve()), "--serve-worker", args.models]
    if args.device == "cpu":
        workers = [Process("worker", [*launcher, "-Q", "detect,align,infer,default", "-c", str(args.concurrency),
                                      "-n", "bench@%h"], pipeline_env, tmp / "worker.log", cwd=ROOT)]
    else:
        workers = [Process("gpu-worker", [*launcher, "-Q", "detect,align,infer", "-c", str(args.gpu_procs),
                                          "-n", "gpu@%h"], pipeline_env, tmp / "gpu-worker.log", cwd=ROOT),
                   Process("cpu-worker", [sys.executable, "-m", "shared.cli", "worker", "-Q", "default", "-c", "2",
                                          "-n", "cpu@%h"], env, tmp / "cpu-worker.log", cwd=ROOT)]
    port = free_port()
    web = Process("web", [sys.executable, "-m", "shared.cli", "web", "--port", str(port), "--workers",
                               str(args.web_workers)], env, tmp / "web.log", cwd=ROOT)
    procs = [*workers, web]
    try:
        for p in procs:
            p.start()
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", web)
        groups = {"web": [web], "workers": workers, **{name: [p] for name, p in engines.processes.items()}}
        run(url, args, srcs, groups)
    except BaseException:
        for p in workers:
            if p.log and p.log.exists():
                console.print(p.log.read_text()[-3000:])
        raise
    finally:
        for p in procs:
            p.stop()
        engines.stop()


def random_production_env(tmp: Path) -> dict[str, str]:
    """RetinaFace-R50 and FAN with random weights, unless the real files are present."""
    from shared.ml.weights import WEIGHTS_BY_KEY, locate

    env = {"GESTALT_DETECTOR": "retinaface", "GESTALT_LANDMARKER": "fan"}
    if locate(WEIGHTS_BY_KEY["retinaface_resnet50"]) and locate(WEIGHTS_BY_KEY["fan"]):
        return env
    sys.path.insert(0, str(ROOT / "bench"))
    from preprocess import random_production_weights

    random_production_weights(tmp / "torch" / "hub" / "checkpoints")
    os.environ.pop("GESTALT_WEIGHTS_DIR", None)
    return {**env, "TORCH_HOME": str(tmp / "torch"), "GESTALT_WEIGHTS_VERIFY": "0"}


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def wait_settled(ids: list[int], timeout: float, settled=("done", "rejected", "failed")) -> dict[str, int]:
    from sqlalchemy import func, select

    from shared.db import session_scope
    from shared.models import Image as ImageRow

    deadline = time.monotonic() + timeout
    while True:
        with session_scope() as s:
            counts = dict(s.execute(select(ImageRow.status, func.count()).where(ImageRow.id.in_(ids))
                                    .group_by(ImageRow.status)).all())
        if sum(counts.get(k, 0) for k in settled) >= len(ids) or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def register(args):
    import torch

    from shared.db import session_scope
    from shared.ml.gestalt import RegionalEnsemble
    from shared.ml.regions import DEFAULT_REGIONS
    from shared.storage import get_storage

    try:
        from shared.modelops import registry
    except ImportError:  # before the model operations moved
        from shared.ml import registry

    torch.manual_seed(0)
    width = 0.125 if args.models == "null" else args.width
    model = RegionalEnsemble(DEFAULT_REGIONS, args.classes, width=width).eval()
    with session_scope() as s:
        version = registry.register_model(s, get_storage(), model, [f"syndrome-{i:03d}" for i in range(args.classes)],
                                          {"note": "benchmark, random weights"}, name="bench")
        registry.activate(s, version)
    return model


def run(url: str, args, srcs: list[np.ndarray], groups: dict[str, list[Process]]) -> None:
    from shared.db import session_scope
    from shared.models import Image as ImageRow

    model = register(args)
    portal = Portal(url, new_user())
    token = portal.csrf("/cases/new")
    label = f"{args.models} models, {args.device}" + (", preloaded queue" if args.preload else "") + \
        (f", {args.label}" if args.label else "")
    n_warm = 2 * (args.concurrency if args.device == "cpu" else args.gpu_procs)
    blobs = distinct_jpegs(srcs, n_warm + args.single + args.uploads)
    cases = [portal.create_case(f"PT-B{i}") for i in range(max(1, args.uploads // 4) + 2)]

    def upload(i: int, case_id: int) -> int:
        r = portal.upload(case_id, [(f"p{i}.jpg", blobs[i])], token=token)
        assert r.status_code == 201, r.text
        return r.json()["images"][0]["id"]

    # Warm up every worker process (model load, detector graphs).
    wait_settled([upload(i, cases[0]) for i in range(n_warm)], 600)

    # 1. Single uploads, one at a time.
    if args.single:
        stages: dict[str, list[float]] = {k: [] for k in ("queue", "detect", "align", "infer", "end to end")}
        ids = []
        for i in range(args.single):
            ids.append(upload(n_warm + i, cases[1]))
            wait_settled(ids[-1:], 300)
        with session_scope() as s:
            for r in s.query(ImageRow).filter(ImageRow.id.in_(ids)).all():
                t = r.stage_times
                if r.status != "done":
                    continue
                stages["queue"].append(t["detect_start"] - t["uploaded"])
                stages["detect"].append(t["detect_end"] - t["detect_start"])
                stages["align"].append(t["align_end"] - t["align_start"])
                stages["infer"].append(t["done"] - t["infer_start"])
                stages["end to end"].append(t["done"] - t["uploaded"])
        table = Table(title=f"single photo latency, warm workers ({len(stages['infer'])} photos, ~1 MP JPEG; {label})")
        for col in ("stage", "p50 ms", "p95 ms"):
            table.add_column(col, justify="right" if col != "stage" else "left")
        for name, values in stages.items():
            table.add_row(name, f"{pct(values, 50):.0f}", f"{pct(values, 95):.0f}")
        console.print(table)

    # 2. Sustained throughput, with every process's CPU time.
    first = n_warm + args.single
    def upload_all() -> list[int]:
        with ThreadPoolExecutor(args.upload_threads) as pool:
            return list(pool.map(lambda i: upload(first + i, cases[2 + i // 4 % (len(cases) - 2)]),
                                 range(args.uploads)))

    if args.preload:  # the photos wait in the detect queue; the clock starts when the workers take it again
        from worker.celery_app import app as celery_app

        celery_app.control.cancel_consumer("detect", reply=True, timeout=5)
        ids = upload_all()
        xact0, cpu0 = transactions(), cpu_snapshot(groups)
        start = time.monotonic()
        celery_app.control.add_consumer("detect", reply=True, timeout=5)
    else:
        xact0, cpu0 = transactions(), cpu_snapshot(groups)
        start = time.monotonic()
        ids = upload_all()
    counts = wait_settled(ids, 1800)
    elapsed = time.monotonic() - start
    cpu1, xact1 = cpu_snapshot(groups), transactions()
    done = counts.get("done", 0)
    sustained = len(ids) / elapsed
    cpu = {k: 1000 * (cpu1[k] - cpu0[k]) / len(ids) for k in cpu0}
    cpu_total = sum(cpu.values())
    xacts = (xact1 - xact0) / len(ids)

    table = Table(title=f"sustained throughput, {args.uploads} distinct uploads ({label}; "
                        f"width {model.width}, {args.classes} classes, {os.cpu_count()} cores)")
    for col in ("photos/s", "done", "CPU ms/photo, all processes", *[f"{k} ms" for k in cpu], "DB transactions/photo"):
        table.add_column(col, justify="right")
    table.add_row(f"{sustained:.2f}", f"{done}/{len(ids)}", f"{cpu_total:.1f}", *[f"{v:.1f}" for v in cpu.values()],
                  f"{xacts:.1f}")
    console.print(table)
    rows = [{"bench": "pipeline", "what": f"sustained photos/s ({label}, {args.uploads} uploads)",
             "value": round(sustained, 2), "unit": "photos/s"},
            {"bench": "pipeline", "what": f"CPU ms per photo, all processes ({label})", "value": round(cpu_total, 1),
             "unit": "ms", "note": ", ".join(f"{k} {v:.1f}" for k, v in cpu.items())},
            {"bench": "pipeline", "what": f"DB transactions per photo ({label})", "value": round(xacts, 1),
             "unit": "transactions"}]
    if done < len(ids):
        console.print(f"[red]not every photo was scored: {counts}[/red]")

    # 3. The networks alone, in the same run.
    if args.models != "null" and not args.no_bound:
        bounds = network_bounds(args, srcs, model)
        table = Table(title=f"the networks alone on pre-decoded photos, same run ({label})")
        for col in ("bound", "photos/s", "pipeline / bound"):
            table.add_column(col, justify="right" if col != "bound" else "left")
        # The CPU-bound figures do not move with other load on the machine: cores / CPU ms per photo.
        capacity = (os.cpu_count() or 2) / (cpu_total / 1000)
        if args.device == "cpu":
            table.add_row(f"pipeline, CPU-bound: {os.cpu_count()} cores / {cpu_total:.0f} CPU ms per photo",
                          f"{capacity:.2f}", "")
            rows.append({"bench": "pipeline", "what": f"pipeline CPU-bound capacity ({label})",
                         "value": round(capacity, 2), "unit": "photos/s"})
        for name, value in bounds.items():
            ratio = (capacity if "CPU-bound" in name else sustained) / value
            table.add_row(name, f"{value:.2f}", f"{ratio:.0%}")
            rows.append({"bench": "pipeline", "what": f"{name} ({label})", "value": round(value, 2),
                         "unit": "photos/s", "note": f"pipeline reaches {ratio:.0%}"})
        console.print(table)
    if args.rows:
        with args.rows.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


def _networks_alone(conn, models: str, device: str, blobs: list[bytes], box_face: dict | None, width: float,
                    classes: int, threads: int) -> None:
    """One process's photos/s of detector + landmarks + regional CNNs (spawned: a clean torch)."""
    import torch

    from shared.config import get_settings
    from shared.ml.gestalt import RegionalEnsemble, predict, prepare_for_inference, resolve_device
    from shared.ml.imaging import decode_stored
    from shared.ml.preprocess import Preprocessor
    from shared.ml.regions import CROP_SIZE, DEFAULT_REGIONS

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
        predict(model, crops, precision=settings.infer_precision)

    one(rgbs[0])
    conn.send("ready")
    conn.recv()  # start together
    t0, c0 = time.perf_counter(), time.process_time()
    for rgb in rgbs:
        one(rgb)
    conn.send((len(rgbs) / (time.perf_counter() - t0), (time.process_time() - c0) / len(rgbs)))
    pre.close()


def network_bounds(args, srcs: list[np.ndarray], model) -> dict[str, float]:
    """Photos/s of the networks alone: one process per core as the workers run, and the CNN-only figure."""
    import multiprocessing as mp

    import torch

    from shared.ml.gestalt import predict
    from shared.ml.regions import DEFAULT_REGIONS

    cores = os.cpu_count() or 2
    procs = cores if args.device == "cpu" else args.gpu_procs
    blobs = distinct_jpegs(srcs, max(2, min(40, args.uploads // procs)), offset=10**6)
    face = json.loads(os.environ[FACE_ENV]) if args.models != "real" else None
    ctx = mp.get_context("spawn")
    pipes, children = [], []
    for _ in range(procs):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_networks_alone, args=(child, args.models, args.device, blobs, face, model.width,
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
    rate = sum(r for r, _ in answers)
    cpu_ms = 1000 * sum(c for _, c in answers) / len(answers)
    out = {f"networks alone: detector + landmarks + CNNs, {procs} process(es)": rate}
    if args.device == "cpu":
        out[f"networks alone, CPU-bound: {cores} cores / {cpu_ms:.0f} CPU ms per photo"] = cores / (cpu_ms / 1000)
    if args.device == "cpu":
        torch.set_num_threads(cores)
        crops = np.random.default_rng(0).integers(0, 255, (64, len(DEFAULT_REGIONS), 100, 100), dtype=np.uint8)
        predict(model, crops[:32], batch_size=32)
        t0 = time.monotonic()
        predict(model, crops, batch_size=32)
        out[f"CNN-only bound (ensemble alone, {cores} threads)"] = len(crops) / (time.monotonic() - t0)
    return out


if __name__ == "__main__":
    main()

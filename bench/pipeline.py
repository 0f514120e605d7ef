"""End-to-end pipeline benchmark on the real stack.

Starts the embedded engines, real Celery workers and the portal, registers a
paper-width CASIA-Net ensemble (random weights: speed does not depend on them),
then prints:

1. per-stage latency p50/p95 for single uploads with warm workers;
2. sustained throughput over N uploads, as a ratio to the CNN-only bound
   (the same ensemble scoring pre-cut crops on all cores) measured in the same run.

Usage: python bench/pipeline.py [--uploads 100] [--single 15] [--classes 300] [--width 1.0]
"""
from __future__ import annotations

import argparse
import io
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

console = Console()


def photos() -> list[bytes]:
    """About 1 MP JPEGs of real faces: the astronaut, plus the shared people photos when present."""
    out = []
    img = Image.fromarray(data.astronaut()).resize((1000, 1000))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    out.append(buf.getvalue())
    people = ROOT.parent / "shared" / "data" / "faces" / "people"
    for path in sorted(people.glob("img*.jpg"))[:20] if people.exists() else []:
        im = Image.open(path).convert("RGB")
        scale = (1e6 / (im.width * im.height)) ** 0.5
        im = im.resize((int(im.width * scale), int(im.height * scale)))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--uploads", type=int, default=100)
    ap.add_argument("--single", type=int, default=15)
    ap.add_argument("--classes", type=int, default=300)
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gestalt-bench-"))
    engines = EmbeddedEngines(tmp, Ports.free())
    engines.start()
    os.environ.update(engines.env)
    os.environ.update(TEST_SETTINGS)
    os.environ["GESTALT_MAX_UPLOAD_MB"] = "20"
    from shared import migrate
    from shared.config import reload_settings

    reload_settings()
    migrate.upgrade()
    env = {**os.environ}
    procs = [
        Process("worker", [sys.executable, "-m", "shared.cli", "worker", "-Q", "detect,align,infer,default",
                           "-c", str(args.concurrency), "-n", "bench@%h"], env, tmp / "worker.log"),
    ]
    port = free_port()
    procs.append(Process("web", [sys.executable, "-m", "shared.cli", "web", "--port", str(port), "--workers", "2"],
                         env, tmp / "web.log"))
    try:
        for p in procs:
            p.start()
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", procs[1])
        run(url, args)
    finally:
        for p in procs:
            p.stop()
        engines.stop()


def run(url: str, args) -> None:
    import torch

    from shared.db import session_scope
    from shared.ml.gestalt import RegionalEnsemble, predict
    from shared.ml.regions import DEFAULT_REGIONS
    from shared.modelops import registry
    from shared.models import Image as ImageRow
    from shared.storage import get_storage

    torch.manual_seed(0)
    model = RegionalEnsemble(DEFAULT_REGIONS, args.classes, width=args.width).eval()
    with session_scope() as s:
        version = registry.register_model(s, get_storage(), model, [f"syndrome-{i:03d}" for i in range(args.classes)],
                                          {"note": "benchmark, random weights"}, name="bench")
        registry.activate(s, version)

    portal = Portal(url, new_user())
    imgs = photos()

    def upload_one(i: int) -> int:
        case_id = portal.create_case(f"PT-B{i}")
        r = portal.upload(case_id, [("p.jpg", imgs[i % len(imgs)])])
        assert r.status_code == 201, r.text
        return case_id

    # Warm up every worker process (model load, detector graphs).
    for case_id in [upload_one(i) for i in range(2 * args.concurrency)]:
        portal.wait(case_id)

    # 1. Single uploads, one at a time.
    stages: dict[str, list[float]] = {k: [] for k in ("queue", "detect", "align", "infer", "end to end")}
    for i in range(args.single):
        case_id = upload_one(i)
        portal.wait(case_id, settled=("done", "rejected", "failed"))
    with session_scope() as s:
        rows = s.query(ImageRow).order_by(ImageRow.id.desc()).limit(args.single).all()
        for r in rows:
            t = r.stage_times
            if r.status != "done":
                continue
            stages["queue"].append(t["detect_start"] - t["uploaded"])
            stages["detect"].append(t["detect_end"] - t["detect_start"])
            stages["align"].append(t["align_end"] - t["align_start"])
            stages["infer"].append(t["done"] - t["infer_start"])
            stages["end to end"].append(t["done"] - t["uploaded"])
    table = Table(title=f"single image latency, warm workers ({len(stages['infer'])} images, ~1 MP JPEG)")
    table.add_column("stage")
    table.add_column("p50 ms", justify="right")
    table.add_column("p95 ms", justify="right")
    for name, values in stages.items():
        table.add_row(name, f"{pct(values, 50):.0f}", f"{pct(values, 95):.0f}")
    console.print(table)

    # 2. Sustained throughput.
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        case_ids = list(pool.map(upload_one, range(args.uploads)))
    for case_id in case_ids:
        portal.wait(case_id, timeout=1800)
    elapsed = time.monotonic() - start
    sustained = args.uploads / elapsed

    # CNN-only bound: the same ensemble on pre-cut crops, all cores, batch 32.
    torch.set_num_threads(os.cpu_count() or 2)
    crops = np.random.default_rng(0).integers(0, 255, (64, len(DEFAULT_REGIONS), 100, 100), dtype=np.uint8)
    predict(model, crops[:32], batch_size=32)
    t0 = time.monotonic()
    predict(model, crops, batch_size=32)
    bound = len(crops) / (time.monotonic() - t0)

    table = Table(title=f"sustained throughput ({args.uploads} uploads, width {args.width}, {args.classes} classes)")
    for col in ("pipeline images/s", "CNN-only bound images/s", "ratio"):
        table.add_column(col, justify="right")
    table.add_row(f"{sustained:.2f}", f"{bound:.2f}", f"{sustained / bound:.0%}")
    console.print(table)


if __name__ == "__main__":
    main()

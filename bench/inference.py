"""Inference benchmark: crops/s of one region network by batch, precision, memory layout and compile.

Each configuration scores random 100x100 crops through :func:`shared.ml.nets.ensemble.predict_regions` (the
same call the worker's CASIA member makes, tensor conversion and softmax included) with a one-region
ensemble, so a batch of B is B crops. The grid is fp32 / bf16 autocast x NCHW / channels-last
x eager / ``torch.compile``, at batches of 1, 64, 1024 and 4096 crops, on the CPU and on CUDA
when there is one.

Then the worker's own path: a model of the default regions loaded as ``ModelCache`` loads it
(``load_checkpoint`` with the compile setting), and ``predict`` as ``worker.pipeline.infer`` calls it:
on one photo (an idle worker) and on ``GESTALT_INFER_BATCH`` photos (a busy worker's batch), with
the flip-TTA and precision settings (set GESTALT_INFER_* to time other choices).
Its crops/s is printed as a ratio of the best configuration measured in the same run on the same
device; the target is at least 50%.

``--quick`` (for a CPU run of a few minutes): width 0.25 nets on the CPU, shorter timing, and no
compile at batches of 1024 and more on the CPU (those cells read "skipped").

Usage: python bench/inference.py [--quick] [--width 1.0] [--classes 216] [--devices cpu,cuda] [--threads N]
"""
from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.config import get_settings  # noqa: E402
from shared.ml.members.casia import casia_only  # noqa: E402
from shared.ml.nets.ensemble import RegionalEnsemble, prepare_for_inference  # noqa: E402
from shared.ml.nets.ensemble import predict_regions as predict  # noqa: E402
from shared.ml.preprocess.regions import CROP_SIZE, DEFAULT_REGIONS  # noqa: E402
from shared.ml.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

BATCHES = (1, 64, 1024, 4096)
TARGET = 0.5  # the worker's path should reach this share of the best configuration


def crops_per_second(model: RegionalEnsemble, crops: np.ndarray, batch: int, precision: str, min_time: float,
                     compiled: bool, **kwargs) -> float:
    """Crops/s of ``predict`` over ``crops`` (one call = ``len(crops)`` faces): the median of calls timed for at
    least ``min_time`` (three calls at least, unless one call alone takes that long). The median keeps a
    shared machine's noise out."""
    # Warm up: a compiled model compiles for this exact shape; an eager one picks its kernels (oneDNN's first
    # calls of a shape are many times slower than the later ones).
    warm = crops if compiled or len(crops) <= 64 else crops[:64]
    for _ in range(2):
        predict(model, warm, batch_size=batch, precision=precision, **kwargs)
    times: list[float] = []
    while not times or (times[0] < min_time and (len(times) < 3 or sum(times) < min_time)):
        start = time.perf_counter()
        predict(model, crops, batch_size=batch, precision=precision, **kwargs)  # returns numpy: synchronised
        times.append(time.perf_counter() - start)
    return crops.shape[0] * crops.shape[1] / statistics.median(times)


def grid(device: torch.device, args, console: Console) -> tuple[Table, float, str]:
    """The configuration table of one device, the best crops/s and its configuration's name."""
    width = 0.25 if args.quick and device.type == "cpu" and args.width is None else (args.width or 1.0)
    rng = np.random.default_rng(0)
    table = Table(title=f"crops/s on {device.type} (CASIA-Net width {width}, {args.classes} classes, "
                        f"{torch.get_num_threads() if device.type == 'cpu' else 1} "
                        f"{'threads' if device.type == 'cpu' else 'GPU'})")
    for col in ("precision", "layout", "compile", *[f"batch {b}" for b in args.batches]):
        table.add_column(col, justify="right")
    best, best_name = 0.0, ""
    compiles = {"no": (False,), "yes": (True,), "both": (False, True)}[args.compile]
    for precision, channels_last, compiled in itertools.product(("fp32", "bf16"), (False, True), compiles):
        torch.manual_seed(0)
        model = prepare_for_inference(RegionalEnsemble(("full_face",), args.classes, width=width), device,
                                      channels_last=channels_last, compile=compiled)
        cells = []
        for batch in args.batches:
            if compiled and args.quick and device.type == "cpu" and batch >= 1024:
                cells.append("skipped")
                continue
            crops = rng.integers(0, 256, (batch, 1, CROP_SIZE, CROP_SIZE), dtype=np.uint8)
            try:
                rate = crops_per_second(model, crops, batch, precision, args.min_time, compiled)
            except torch.OutOfMemoryError:
                cells.append("out of memory")
                torch.cuda.empty_cache()
                continue
            name = f"{device.type} {precision} {'channels-last' if channels_last else 'NCHW'} " \
                   f"{'compiled' if compiled else 'eager'} batch {batch}"
            console.log(f"{name}: {rate:,.0f} crops/s")
            if rate > best:
                best, best_name = rate, name
            cells.append(f"{rate:,.0f}")
        table.add_row(precision, "channels-last" if channels_last else "NCHW", "yes" if compiled else "no", *cells)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return table, best, best_name


def worker_path(device: torch.device, args, faces: int) -> tuple[float, str]:
    """Crops/s of the worker's call on ``faces`` photos: the default regions, the worker's settings.

    One photo is an idle worker; ``GESTALT_INFER_BATCH`` photos is a worker whose queue is backed
    up, when one infer task claims the photos waiting behind it (``worker.pipeline.claim_waiting``).
    """
    settings = get_settings()
    width = 0.25 if args.quick and device.type == "cpu" and args.width is None else (args.width or 1.0)
    torch.manual_seed(0)
    net = RegionalEnsemble(DEFAULT_REGIONS, args.classes, width=width)
    data = save_checkpoint(casia_only(net, [f"s{i}" for i in range(args.classes)]), {})
    # as ModelCache loads it
    model = load_checkpoint(data, device, compile=settings.infer_compile)[0].member("casia").net
    stack = np.random.default_rng(1).integers(0, 256, (faces, len(DEFAULT_REGIONS), CROP_SIZE, CROP_SIZE),
                                              dtype=np.uint8)
    rate = crops_per_second(model, stack, 256, settings.infer_precision, args.min_time, settings.infer_compile,
                            flip_tta=settings.infer_flip_tta)
    how = (f"{faces} photo(s) x {len(DEFAULT_REGIONS)} regions, precision {settings.infer_precision}, "
           f"compile {settings.infer_compile}, flip TTA {settings.infer_flip_tta}, width {width}")
    return rate, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a CPU run of a few minutes (see above)")
    parser.add_argument("--width", type=float, default=None, help="CASIA-Net width (default 1.0, the paper's)")
    parser.add_argument("--classes", type=int, default=216, help="output classes (the paper's 216 syndromes)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="crops per call")
    parser.add_argument("--min-time", type=float, default=None, help="seconds timed per cell (at least one call)")
    parser.add_argument("--devices", default=None, help="cpu,cuda (default: cpu, and cuda when available)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads (0: torch's default). On a busy machine 1 avoids stalls of threads that "
                             "wait for a descheduled sibling")
    parser.add_argument("--compile", choices=("no", "yes", "both"), default="both",
                        help="which rows of the grid use torch.compile (bench/gpu.sh: no, to fit its time)")
    parser.add_argument("--rows", type=Path, default=None, help="append the results as JSON lines (bench/gpu.sh)")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.min_time = args.min_time if args.min_time is not None else (0.3 if args.quick else 2.0)
    devices = args.devices.split(",") if args.devices else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    console = Console(width=max(Console().width, 140))
    summary = Table(title=f"the worker's inference path vs the best configuration (target >= {TARGET:.0%})")
    for col in ("device", "worker path", "crops/s", "best configuration", "best crops/s", "ratio", "target"):
        summary.add_column(col, justify="right")
    rows: list[dict] = []
    for name in devices:
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            console.print("[yellow]CUDA is not available on this machine: skipping it[/yellow]")
            continue
        table, best, best_name = grid(device, args, console)
        console.print(table)
        for faces in (1, get_settings().infer_batch):
            rate, how = worker_path(device, args, faces)
            ratio = rate / best if best else float("nan")
            # The target is the throughput of a busy worker; an idle one answers a single photo fast enough.
            verdict = ("met" if ratio >= TARGET else "missed") if faces > 1 else "(latency)"
            summary.add_row(name, how, f"{rate:,.0f}", best_name, f"{best:,.0f}", f"{ratio:.0%}", verdict)
            rows.append({"bench": "inference", "what": f"worker path, {name}: {how}", "value": round(rate),
                         "unit": "crops/s", "note": f"{ratio:.0%} of the best ({best_name}: {best:,.0f}); {verdict}"})
    console.print(summary)
    if args.rows:
        import json

        with args.rows.open("a") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

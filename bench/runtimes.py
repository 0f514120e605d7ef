"""The networks at each CPU runtime: ms per face by network x runtime x precision x batch, with accuracy checks.

For every network a CPU worker runs through PyTorch (the identity encoder, the regional CASIA-Nets, RetinaFace
MobileNet-0.25, and with ``--networks all`` RetinaFace ResNet-50 and the FAN on random weights), one runner per
runtime of ``shared.ml.runtime`` (``create_runner``, the call the workers make): PyTorch eager fp32 channels-last,
``torch.compile``, ONNX Runtime fp32 on the CPU execution provider, ONNX Runtime int8 (static, calibrated on the
workers' calibration inputs) and ONNX Runtime int8 with dynamic activations.

Timing: the runtimes take turns within each round (the order rotates), so a shared machine's load falls on all of
them alike; a cell is the median of the rounds, in ms per face (per photo for the detector), and its ratio to eager
in the same run. Accuracy: every runtime's outputs on the real test faces (the shared people photos through the
real Preprocessor; batches of 1 and 8, the worse counted) against eager fp32: descriptors at cosine >= 0.999;
the regional ranking (top 10 of the aggregate) unchanged; the detector's main face at IoU >= 0.9. ``auto`` must be
the fastest runtime that passes for the encoder and the regional nets (the networks GESTALT_CPU_RUNTIME runs).

Then the mediapipe networks (BlazeFace, FaceMesh; TFLite with XNNPACK inside mediapipe's graph), which run as they
ship: ms per photo and per face through the workers' own classes.

Usage: python bench/runtimes.py [--networks encoder,regions,retinaface|all] [--runtimes eager,onnx,...]
       [--threads 1] [--rounds 5] [--photos 64] [--width 1.0] [--classes 216] [--device cpu|cuda] [--rows FILE]
"""
from __future__ import annotations

import argparse
import json
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

from bench._runtimes.networks import BUILDERS, Network, faces  # noqa: E402
from shared.config import get_settings  # noqa: E402
from shared.ml.runtime.choices import AUTO_CPU_RUNTIME, CPU_RUNTIMES  # noqa: E402
from shared.ml.runtime.runners import create_runner  # noqa: E402

PRECISION = {"eager": "fp32", "compile": "fp32", "onnx": "fp32", "onnx-int8": "int8 (static)",
             "onnx-int8-dynamic": "int8 (dynamic)", "eager-bf16": "bf16 autocast", "onnx-cuda": "fp32"}
DEFAULT_NETWORKS = ("encoder", "regions", "retinaface")


def build_runners(net: Network, runtimes: list[str], device: str, console: Console, cache_dir=None) -> dict:
    """``{runtime: (runner, seconds to build)}``; a runtime that cannot run here is left out, and ``net.skipped``
    says why (e.g. ONNX Runtime's CUDA provider without the onnxruntime-gpu package)."""
    out = {}
    for runtime in runtimes:
        if runtime.startswith("onnx-int8") and not net.int8_judged:
            console.print(f"{net.name}: {runtime} skipped (random weights: no accuracy to judge)")
            continue
        start = time.perf_counter()
        try:
            if runtime == "eager-bf16":
                runner = create_runner(net.module.to(device), _spec(net), "eager", "bf16")
            elif runtime == "onnx-cuda":
                runner = create_runner(net.module, _spec(net), "onnx", provider="CUDAExecutionProvider")
            else:
                module = net.module.to(device)
                runner = create_runner(module, _spec(net), runtime, "fp32", calibration=net.calibration,
                                       channels_last=net.channels_last, cache_dir=cache_dir)
        except Exception as exc:  # noqa: BLE001 - a runtime that cannot run this network is a row saying so
            why = str(exc).splitlines()[0]
            if runtime == "onnx-cuda":
                why = f"onnxruntime-gpu is not installed ({why})"
            console.print(f"[yellow]{net.name}: {runtime} skipped: {why}[/yellow]")
            net.skipped.append((runtime, why))
            continue
        out[runtime] = (runner, time.perf_counter() - start)
    return out


def _spec(net: Network):
    from shared.ml.runtime.runners import InputSpec

    return InputSpec(net.shape)


def _tile(x: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(np.resize(x, (n, *x.shape[1:])))


def _outputs(runner, x: np.ndarray, batch: int) -> tuple[np.ndarray, ...]:
    parts = [runner(x[i:i + batch]) for i in range(0, len(x), batch)]
    return tuple(np.concatenate(p) for p in zip(*parts, strict=True))


def accuracy(net: Network, runners: dict) -> dict[str, tuple[str, bool]]:
    """Each runtime against eager fp32 on the test inputs, at batches 1 and 8 (the worse result counts)."""
    ref = _outputs(runners["eager"][0], net.inputs, 8)
    out = {}
    for runtime, (runner, _) in runners.items():
        results = [net.check(ref, _outputs(runner, net.inputs, b)) for b in (1, 8)]
        out[runtime] = next((r for r in results if not r[1]), results[-1])
    return out


def timings(net: Network, runners: dict, batch: int, rounds: int) -> dict[str, float]:
    """ms per item of each runner at ``batch``: the runners take turns each round, in a rotating order."""
    x = _tile(net.inputs, batch)
    names = list(runners)
    for name in names:  # warm up: compile, pick kernels
        runners[name][0](x)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            runners[name][0](x)
            samples[name].append(time.perf_counter() - start)
    return {n: 1000 * statistics.median(s) / batch for n, s in samples.items()}


def network_rows(net: Network, args, console: Console, table: Table, rows: list[dict]) -> dict:
    runners = build_runners(net, args.runtimes, args.device, console, args.cache_dir)
    if "eager" not in runners:
        console.print(f"[red]{net.name}: no eager runner, nothing to compare against[/red]")
        return {}
    for runtime, why in net.skipped:
        table.add_row(net.name, runtime, PRECISION.get(runtime, ""), "-", "skipped", why, "-")
        rows.append({"bench": "runtimes", "what": f"{net.name}, {runtime} ({args.device})", "value": "-",
                     "unit": "", "note": f"skipped: {why}"})
    checks = accuracy(net, runners)
    # Each repeat times every batch again (the three repeats of one run, for a loaded machine's noise).
    runs = [{b: timings(net, runners, b, args.rounds) for b in net.batches} for _ in range(args.repeat)]
    for runtime, (_, built) in runners.items():
        timing = []
        for b in net.batches:
            ms = "/".join(f"{run[b][runtime]:.2f}" for run in runs)
            ratio = "/".join(f"{run[b]['eager'] / run[b][runtime]:.2f}" for run in runs)
            timing.append(f"{b}: {ms} ({ratio}x)")
        text, ok = checks[runtime]
        table.add_row(net.name, runtime, PRECISION.get(runtime, ""), f"{built:.1f}", "; ".join(timing), text,
                      "pass" if ok else "FAIL")
        rows.append({"bench": "runtimes", "what": f"{net.name}, {runtime} ({args.device})", "value": "; ".join(timing),
                     "unit": "ms/face (x eager)", "note": f"{text}; {'pass' if ok else 'FAIL'}"})
    return {r: (statistics.geometric_mean([run[b][r] for run in runs for b in net.batches]), checks[r][1])
            for r in runners}


def mediapipe_rows(args, table: Table, rounds: int) -> None:
    """The TFLite networks as shipped (see bench/_runtimes/tflite.py for what cannot be measured)."""
    from bench._runtimes.networks import _photos
    from bench._runtimes.tflite import graph_rows, interpreter_rows

    photos = _photos(16)
    for name, how, ms in graph_rows(photos, rounds):
        table.add_row(name, how, "fp32", "-", f"1: {ms:.2f}", "as the workers run it", "-")
    for name, how, ms, accuracy in interpreter_rows(photos, rounds):
        table.add_row(name, how, "fp32", "-", f"1: {ms:.2f}", accuracy, "-")
    table.add_row("BlazeFace, FaceMesh", "ONNX Runtime", "-", "-", "not measured",
                  "converting TFLite to ONNX needs tf2onnx and TensorFlow", "-")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--networks", default=",".join(DEFAULT_NETWORKS), help=f"of {', '.join(BUILDERS)}, or all")
    ap.add_argument("--runtimes", default=",".join(CPU_RUNTIMES))
    ap.add_argument("--threads", type=int, default=1, help="torch and ONNX Runtime threads (1: a worker process's "
                    "share of 2 cores with GESTALT_WORKER_CONCURRENCY=2)")
    ap.add_argument("--rounds", type=int, default=5, help="timed calls per runtime and batch (taking turns)")
    ap.add_argument("--repeat", type=int, default=3, help="times each cell is measured again, all shown")
    ap.add_argument("--photos", type=int, default=64, help="people photos preprocessed for the test inputs")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--classes", type=int, default=216)
    ap.add_argument("--batches", default=None, help="override every network's batches, e.g. 1,8")
    ap.add_argument("--device", default="cpu", help="cuda: eager fp32 and bf16, and ONNX Runtime's CUDA provider")
    ap.add_argument("--no-mediapipe", action="store_true")
    ap.add_argument("--cache-dir", default=None, help="keep the ONNX exports here (build s then reads a cache hit)")
    ap.add_argument("--rows", default=None, help="append each row to this file as a JSON line (bench/gpu.sh)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.infer_batch = get_settings().infer_batch
    args.runtimes = args.runtimes.split(",")
    if args.device == "cuda":
        args.runtimes = ["eager", "eager-bf16", "onnx-cuda"]
    names = list(BUILDERS) if args.networks == "all" else args.networks.split(",")
    console = Console(width=max(Console().width, 200))
    table = Table(title=f"ms per face by runtime ({args.device}, {args.threads} thread(s), median of {args.rounds} "
                        f"rounds, repeated {args.repeat} times: a/b/c; in brackets: x eager in the same repeat)")
    for col in ("network", "runtime", "precision", "build s", "batch: ms/face (x eager)", "accuracy vs eager fp32",
                "check"):
        table.add_column(col)
    console.print(f"test faces: {len(faces(args.photos))} of {args.photos} people photos")
    rows: list[dict] = []
    best: dict[str, dict] = {}
    for name in names:
        net = BUILDERS[name](args)
        if args.batches:
            net.batches = tuple(int(b) for b in args.batches.split(","))
        best[name] = network_rows(net, args, console, table, rows)
        del net
    if args.device == "cpu" and not args.no_mediapipe:
        mediapipe_rows(args, table, args.rounds)
    console.print(table)
    decide(best, console)
    if args.rows:
        with open(args.rows, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


def decide(best: dict[str, dict], console: Console) -> None:
    """The fastest passing runtime per network (geometric mean of its ms/face over the batches)."""
    for name, results in best.items():
        passing = {r: ms for r, (ms, ok) in results.items() if ok}
        if passing:
            winner = min(passing, key=passing.get)
            console.print(f"{name}: fastest passing runtime {winner} ({passing[winner]:.2f} ms/face, geometric mean "
                          f"over batches; eager {results['eager'][0]:.2f})"
                          + ("" if name not in AUTO_CPU_RUNTIME else
                             f"; auto is {AUTO_CPU_RUNTIME[name]}"
                             + (" (agrees)" if winner == AUTO_CPU_RUNTIME[name] else " (DISAGREES)")))


if __name__ == "__main__":
    main()

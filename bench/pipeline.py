"""End-to-end pipeline benchmark on the real stack.

Starts the embedded engines, real Celery workers and the portal, registers a model (random weights: speed does
not depend on them; ``--kind members``, the default, is the kind ``gestalt train`` makes: heads on the face
encoder's descriptors of the four regions' cuts and the face chip; ``--kind casia`` the regional CASIA-Nets of
``--width``), then prints:

1. per-stage latency p50/p95 for single uploads with warm workers (``--single``);
2. sustained throughput over N uploads, each a distinct ~1 MP JPEG, with the CPU time of every
   process of the stack (web, workers, PostgreSQL, Redis, the object store; from ``psutil``)
   and the database transactions, each divided by photos;
3. for real models, the bound set by the networks alone in the same run: detector, landmarks
   and the model's members on pre-decoded photos, the model loaded as a worker loads it (the same CPU
   runtime, ``GESTALT_CPU_RUNTIME``) and run on a worker's batch of photos, one process per core (as the
   workers run), and the model alone (all cores in one process);
4. with ``--finished-messages N``, the workers' CPU for a message whose photo a batch already finished.

``--models`` chooses what runs where the networks are:

* ``real``: the worker's own backends (the settings' detector and landmarks; offline ones
  without production weights) and the registered model.
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
       [--classes 300] [--kind members|casia] [--width 1.0] [--concurrency N] [--device cpu|cuda] [--rows FILE.jsonl]
       [--profile FOLDER] [--finished-messages N]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _pipeline.bounds import network_bounds  # noqa: E402
from _pipeline.measure import (  # noqa: E402
    Uploader,
    done_photos,
    finished_messages,
    single_latencies,
    sustained,
    wait_settled,
)
from _pipeline.photos import distinct_jpegs, sources  # noqa: E402
from _pipeline.profiling import PROFILE_ENV  # noqa: E402
from _pipeline.stack import (  # noqa: E402
    register,
    share_known_face,
    start_engines,
    web_process,
    worker_processes,
)
from _pipeline.stand_ins import serve_worker  # noqa: E402
from _pipeline.tables import (  # noqa: E402
    append_rows,
    bound_rows,
    console,
    finished_message_rows,
    print_latency,
    run_label,
    throughput_rows,
)

from shared.stack import Process  # noqa: E402
from tests.conftest import Portal, new_user, wait_http  # noqa: E402

MODES = ("real", "null", "random-production")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", choices=MODES, default="real")
    ap.add_argument("--null-models", action="store_true", help="the same as --models null")
    ap.add_argument("--uploads", type=int, default=100)
    ap.add_argument("--single", type=int, default=15)
    ap.add_argument("--classes", type=int, default=300)
    ap.add_argument("--kind", choices=("members", "casia"), default="members",
                    help="the model: encoder members (what gestalt train makes by default) or CASIA-Nets (--width)")
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
    ap.add_argument("--finished-messages", type=int, default=0, metavar="N",
                    help="after the run, N detect messages of finished photos: the workers' CPU per such message")
    ap.add_argument("--profile", type=Path, default=None,
                    help="cProfile the worker processes (null or random-production models) over the sustained run "
                         "into this folder; python -m bench._pipeline.profiling FOLDER prints it")
    args = ap.parse_args()
    if args.null_models:
        args.models = "null"
    return args


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve-worker":
        serve_worker(sys.argv[2], sys.argv[3:])
        return
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gestalt-bench-"))
    engines = start_engines(args.models, tmp)
    srcs = sources(args.models, args.megapixels)
    share_known_face(args.models, srcs)
    env = {**os.environ}
    if args.profile:
        env[PROFILE_ENV] = str(args.profile.resolve())
    workers = worker_processes(args, tmp, env)
    web, port = web_process(args, tmp, env)
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


def run(url: str, args, srcs: list[np.ndarray], groups: dict[str, list[Process]]) -> None:
    """Warm every worker process up, then 1. single uploads, 2. sustained throughput, 3. the bound."""
    model = register(args)
    portal = Portal(url, new_user())
    token = portal.csrf("/cases/new")
    label = run_label(args)
    n_warm = 2 * (args.concurrency if args.device == "cpu" else args.gpu_procs)
    upload = Uploader(portal, token, distinct_jpegs(srcs, n_warm + args.single + args.uploads))
    cases = [portal.create_case(f"PT-B{i}") for i in range(max(1, args.uploads // 4) + 2)]

    # Warm up every worker process (model load, detector graphs).
    wait_settled([upload(i, cases[0]) for i in range(n_warm)], 600)

    # 1. Single uploads, one at a time.
    if args.single:
        print_latency(single_latencies(upload, n_warm, args.single, cases[1]), label)

    # 2. Sustained throughput, with every process's CPU time.
    result = sustained(args, upload, n_warm + args.single, cases, groups)
    rows = throughput_rows(result, args, label, model.label)
    if args.finished_messages:
        rows += finished_message_rows(finished_messages(done_photos(), groups, args.finished_messages), label)

    # 3. The networks alone, in the same run.
    if args.models != "null" and not args.no_bound:
        rows += bound_rows(network_bounds(args, srcs, model), result, args.device, label)
    append_rows(args.rows, rows)


if __name__ == "__main__":
    main()

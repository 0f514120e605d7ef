"""Wall time of a nightly heads retrain against the number of diagnosed images.

Synthetic features shaped like production: 7 regions, 320-d CASIA-Net features,
200+ classes. Feature computation is excluded (it is cached when photos are scored).

Usage: python bench/retrain.py [--sizes 1000 10000 100000] [--classes 216] [--regions 7]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.ml.train.heads import HeadConfig, train_heads  # noqa: E402


def synthetic(n: int, regions: int, dim: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, regions, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    return centres[labels] + rng.normal(0, 2, (n, regions, dim)).astype(np.float32), labels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    ap.add_argument("--classes", type=int, default=216)
    ap.add_argument("--regions", type=int, default=7)
    ap.add_argument("--dim", type=int, default=320)
    ap.add_argument("--epochs", type=int, default=HeadConfig.epochs)
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    table = Table(title=f"heads retrain: {args.regions} regions x {args.dim}-d, {args.classes} classes, "
                        f"{args.epochs} epochs, {torch.get_num_threads()} threads")
    for col in ("images", "seconds", "ms per image", "train top-1"):
        table.add_column(col, justify="right")
    for n in args.sizes:
        x, y = synthetic(n, args.regions, args.dim, args.classes)
        t = time.perf_counter()
        heads = train_heads(x, y, args.classes, HeadConfig(epochs=args.epochs))
        seconds = time.perf_counter() - t
        sample = slice(0, min(n, 5000))
        top1 = float((heads.probs(x[sample]).mean(1).argmax(1) == y[sample]).mean())
        table.add_row(f"{n:,}", f"{seconds:.1f}", f"{1000 * seconds / n:.2f}", f"{top1:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()

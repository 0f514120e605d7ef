"""How long `gestalt train --preset cpu-small` takes on a laptop CPU: about 2,000 photos, the preprocessing cache
filled first (the training run itself is what is timed), one table.

The photos are the screening example's task (docs/examples/make_screening_example.py) at a larger scale: every ORL
photo (40 people, 10 photos each) warped five times, with the hypertelorism warp or the unaffected resampling at
several strengths, so that the labels are told apart by geometry only. Nothing of it is patient data.

    python bench/train_cpu.py [--photos 2000] [--out DIR] [--threads 2] [--finetune auto|off]

Without --finetune the run is what `--preset cpu-small` does by default (the encoder frozen); --finetune auto
times the regions' fine-tuning on top.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = Path(os.environ.get("GESTALT_SHARED_DATA", ROOT.parent / "shared" / "data")) / "faces" / "orl"


def build(out: Path, photos: int) -> Path:
    """``photos`` warped ORL photos (a manifest image,subject,label) in ``out``; reuses a manifest already there."""
    from shared.ml.preprocess.imaging import ImageRejected, decode_upload
    from shared.ml.preprocess.pipeline import Preprocessor
    from shared.ml.train.warps import UNAFFECTED, warp_face

    manifest = out / "train.csv"
    if manifest.exists() and sum(1 for _ in manifest.open()) > photos * 0.9:
        return manifest
    out.mkdir(parents=True, exist_ok=True)
    sources = sorted(DATA.glob("s*/*.pgm"))
    variants = max(1, -(-photos // len(sources)))
    pre, rng, rows = Preprocessor(), np.random.default_rng(0), []
    for k, path in enumerate(sources):
        try:
            rgb = decode_upload(path.read_bytes(), max_bytes=50 * 2**20, max_pixels=4e7, min_side=32).rgb
            landmarks = pre.run(rgb).aligned.landmarks
        except ImageRejected:
            continue
        for v in range(variants):
            label = "hypertelorism" if (k + v) % 2 else UNAFFECTED
            warped, _ = warp_face(rgb, landmarks, label, 0.7 + 0.15 * v, rng)
            target = out / "photos" / f"{path.parent.name}-{path.stem}-{v}.png"
            target.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(target), cv2.cvtColor(warped, cv2.COLOR_RGB2BGR))
            rows.append((f"photos/{target.name}", path.parent.name, label))
    pre.close()
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "subject", "label"])
        writer.writerows(rows[:photos])
    return manifest


def run(manifest: Path, out: Path, threads: int, finetune: str | None, cache: Path) -> tuple[float, str]:
    """One `gestalt train` run; returns its wall time and its output."""
    command = [sys.executable, "-m", "shared.cli", "train", "--data", str(manifest), "--mode", "binary",
               "--positive", "hypertelorism", "--preset", "cpu-small", "--no-register",
               *(["--finetune", finetune] if finetune else []),
               "--output", str(out / "model.pt"), "--threads", str(threads), "--cache", str(cache)]
    env = {**os.environ, "GESTALT_DATA_DIR": str(out)}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return seconds, done.stderr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--finetune", choices=["auto", "off"], default=None,
                        help="default: what --preset cpu-small does (no fine-tuning)")
    args = parser.parse_args()
    if not DATA.exists():
        raise SystemExit(f"{DATA} is absent: the shared test data is not beside this checkout")
    out = args.out or Path(tempfile.mkdtemp(prefix="gestalt-train-cpu-"))
    manifest = build(out / "data", args.photos)
    cache = out / "prep-cache"
    fill, _ = run(manifest, out, args.threads, "off", cache)  # fills the preprocessing cache
    seconds, log = run(manifest, out, args.threads, args.finetune, cache)
    table = Table(title=f"gestalt train --preset cpu-small, {args.threads} threads, cache filled")
    for column in ("photos", "fine-tuning", "first run (cache filled)", "timed run", "limit"):
        table.add_column(column, justify="right")
    table.add_row(str(sum(1 for _ in manifest.open()) - 1), args.finetune or "preset (off)", f"{fill / 60:.1f} min",
                  f"{seconds / 60:.1f} min", "15 min")
    Console().print(table)
    tail = [line for line in log.splitlines() if "fine-tuned" in line or "frozen encoder" in line or "│" in line]
    Console().print("\n".join(tail[-20:]))


if __name__ == "__main__":
    main()

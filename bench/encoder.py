"""The members' cost per face: cutting the face chip, the encoder forward pass, the heads, and each member.

Rows: the chip cut (``shared.ml.preprocess.facechip.face_chip`` on a real photo's landmarks, CPU), and the
encoder (``shared.ml.nets.encoder.encode``, the call the worker makes) at batches of 1, 8, 32 and 128
chips (up to 1024 on CUDA) in fp32 and, on CUDA, bf16 autocast; then the identity head (an RBF-kernel
head of 1,024 components on 50 classes). Each cell is the median of calls timed for at least
``--min-time`` seconds, in ms per face.

A second table gives each member's network cost per face, as the infer stage pays it (flip averaging on, a
batch of ``--member-batch`` faces): ``identity`` (the encoder on the chip), ``encoder_regions`` (the encoder's
trunk, to its stage features, on the four regions' cuts), ``casia`` (the four CASIA-Nets at the paper's width
on the 100 px crops), and the whole pass an encoder-backed model makes (chip and cuts in one encoder pass:
``shared.ml.members.model.predict`` of the gallery model, which every trained encoder model reads too). A
member a model gives weight 0 is still scored (its scores are part of the record): this is what it costs.

Usage: python bench/encoder.py [--devices cpu,cuda] [--threads N] [--min-time 2] [--quick] [--batches 1,8]
       [--member-batch 8] [--rows FILE]  (also append each cell as a JSON line, the format bench/gpu.sh collects)
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

from shared.ml.members.identity import _fit as fit_candidate  # noqa: E402
from shared.ml.nets.encoder import CHIP_SIZE, encode, load_encoder  # noqa: E402
from shared.ml.preprocess.facechip import face_chip  # noqa: E402


def ms_per_call(fn, min_time: float) -> float:
    fn()
    fn()  # warm up: the first calls of a shape pick kernels
    times = []
    start = time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        if times[-1] > min_time:
            break
    return 1000 * statistics.median(times)


def chip_row(min_time: float) -> tuple[str, float]:
    from skimage import data

    photo = data.astronaut()  # 512 x 512 RGB
    from shared.ml.preprocess.pipeline import Preprocessor

    pre = Preprocessor()
    landmarks = pre.run(photo).aligned.landmarks
    pre.close()
    return "face chip (CPU, 512 px photo)", ms_per_call(lambda: face_chip(photo, landmarks), min_time)


def member_rows(device: str, precision: str, batch: int, min_time: float) -> list[tuple[str, float]]:
    """(member, ms per face) of each member's networks, and of the encoder-backed model's single pass."""
    from shared.ml.members.model import gallery_model, predict
    from shared.ml.nets.encoder import CONVERTED_SHA256, FEATURE_BLOCK
    from shared.ml.nets.encoder_runner import EncoderRunner
    from shared.ml.nets.ensemble import RegionalEnsemble, predict_regions, prepare_for_inference
    from shared.ml.preprocess.regions import CROP_SIZE, CUT_SIZE, DEFAULT_REGIONS, cut_name

    rng = np.random.default_rng(1)
    runner = EncoderRunner(load_encoder(device), precision)
    chips = rng.integers(0, 256, (batch, CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
    cuts = rng.integers(0, 256, (batch * len(DEFAULT_REGIONS), CUT_SIZE, CUT_SIZE, 3), dtype=np.uint8)
    torch.manual_seed(0)
    casia = prepare_for_inference(RegionalEnsemble(DEFAULT_REGIONS, 216).eval(), device)
    crops = rng.integers(0, 256, (batch, len(DEFAULT_REGIONS), CROP_SIZE, CROP_SIZE), dtype=np.uint8)
    model = gallery_model(CONVERTED_SHA256, DEFAULT_REGIONS)
    stored = {"face_chip": chips, **{cut_name(r): cuts[i::len(DEFAULT_REGIONS)] for i, r in
                                     enumerate(DEFAULT_REGIONS)}}
    timed = {
        "identity (encoder on the chip, flip)": lambda: runner(chips, True),
        "encoder_regions (encoder trunk on 4 cuts, flip)": lambda: runner.run(cuts, True, FEATURE_BLOCK),
        "casia (4 CASIA-Nets, width 1.0, flip)": lambda: predict_regions(casia, crops, flip_tta=True,
                                                                          precision=precision),
        "encoder-backed model, one pass (chip + 4 cuts)": lambda: predict(model, stored, runner, precision),
    }
    return [(name, ms_per_call(fn, min_time) / batch) for name, fn in timed.items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", default="cpu,cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--min-time", type=float, default=2.0)
    ap.add_argument("--quick", action="store_true", help="batches 1 and 8 only, 0.5 s per cell")
    ap.add_argument("--batches", default=None, help="comma-separated encoder batches (default: by device)")
    ap.add_argument("--member-batch", type=int, default=8, help="faces per call in the members' table")
    ap.add_argument("--rows", default=None, help="append each cell to this file as a JSON line")
    args = ap.parse_args()
    rows = []
    if args.threads:
        torch.set_num_threads(args.threads)
    min_time = 0.5 if args.quick else args.min_time
    rng = np.random.default_rng(0)
    table = Table(title=f"identity member, ms per face (torch threads {torch.get_num_threads()})")
    for col in ("step", "device", "precision", "batch", "ms/face", "faces/s"):
        table.add_column(col, justify="left" if col in ("step", "device", "precision") else "right")
    name, ms = chip_row(min_time)
    table.add_row(name, "cpu", "-", "1", f"{ms:.3g}", f"{1000 / ms:.0f}")
    rows.append({"bench": "encoder", "what": name, "value": f"{ms:.3g}", "unit": "ms/face"})
    for device in [d for d in args.devices.split(",") if d]:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        model = load_encoder(device)
        batches = (1, 8) if args.quick else ((1, 8, 32, 128, 1024) if device == "cuda" else (1, 8, 32, 128))
        if args.batches:
            batches = tuple(int(b) for b in args.batches.split(","))
        for precision in ("fp32", "bf16") if device == "cuda" else ("fp32",):
            for batch in batches:
                chips = rng.integers(0, 256, (batch, CHIP_SIZE, CHIP_SIZE, 3), dtype=np.uint8)
                ms = ms_per_call(lambda c=chips, p=precision, m=model: encode(m, c, batch_size=len(c), precision=p),
                                 min_time) / batch
                table.add_row("encoder (dlib ResNet, 150 px chip)", device, precision, str(batch), f"{ms:.3g}",
                              f"{1000 / ms:.0f}")
                rows.append({"bench": "encoder", "what": f"identity encoder, {device} {precision}, batch {batch}",
                             "value": f"{ms:.3g}", "unit": "ms/face", "note": f"{1000 / ms:.0f} faces/s"})
    descriptors = rng.normal(size=(2000, 128)).astype(np.float32)
    labels = rng.integers(0, 50, 1500)
    head = fit_candidate(descriptors[:1500], labels, 50, "linear", 0.0, 1.0, 0)
    rbf = fit_candidate(descriptors[:1500], labels, 50, "rbf", 1.0, 1.0, 0)
    for label, h in (("head, linear", head), ("head, RBF (1,024 components)", rbf)):
        ms = ms_per_call(lambda h=h: h.probs(descriptors[:500]), min_time) / 500
        table.add_row(label, "cpu", "fp32", "500", f"{ms:.3g}", f"{1000 / ms:.0f}")
    Console().print(table)
    members = Table(title=f"each member's networks, ms per face (batch {args.member_batch}, flip averaging on)")
    for col in ("member", "device", "precision", "ms/face", "faces/s"):
        members.add_column(col, justify="left" if col in ("member", "device", "precision") else "right")
    for device in [d for d in args.devices.split(",") if d]:
        if device == "cuda" and not torch.cuda.is_available():
            continue
        for precision in ("fp32", "bf16") if device == "cuda" else ("fp32",):
            for name, ms in member_rows(device, precision, args.member_batch, min_time):
                members.add_row(name, device, precision, f"{ms:.3g}", f"{1000 / ms:.0f}")
                rows.append({"bench": "encoder", "what": f"member {name}, {device} {precision}, batch "
                             f"{args.member_batch}", "value": f"{ms:.3g}", "unit": "ms/face"})
    Console().print(members)
    if args.rows:
        with open(args.rows, "a") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()

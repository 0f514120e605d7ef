"""Preprocessing benchmark: ms/image and images/s per stage and backend, at several batch sizes.

Stages: decode (JPEG -> RGB, EXIF applied), detect (the detector's first, batched pass), find face
(``Preprocessor.detect_batch``: that pass, levelling, and the padded and turned tries for photos
without a face), landmarks
(68 points for the detected box), align (quality gate, similarity warp, 7 crops,
measurements), and the whole path. Photos are about 1 MP JPEGs of real faces.

Backends:

* ``blazeface+facemesh``: the offline default (mediapipe), one photo at a time inside.
* ``retinaface-mobilenet``: RetinaFace MobileNet-0.25 with its real weights
  (``../shared/data/weights`` or the weights folder), FaceMesh landmarks.
* ``retinaface-r50+fan``: the production networks. Without their weight files they run on
  randomly initialised weights, which time the same arithmetic (marked "random weights");
  the landmark and align stages then use the offline detector's boxes.

On a machine with CUDA the production networks also run there (fp16).
The last column is the batching speed-up: images/s at this batch over images/s at batch 1.

Usage: python bench/preprocess.py [--batches 1,8,32] [--photos 32] [--repeat 3] [--devices cpu,cuda]
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from skimage import data

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.ml.formats.weights import WEIGHTS_BY_KEY, locate  # noqa: E402
from shared.ml.preprocess.imaging import ImageRejected, decode_upload  # noqa: E402
from shared.ml.preprocess.pipeline import Detection, Preprocessor  # noqa: E402
from shared.ml.preprocess.regions import ALL_REGIONS  # noqa: E402

console = Console()
SHARED_DATA = Path(os.environ.get("GESTALT_SHARED_DATA", ROOT.parent / "shared" / "data"))
SHARED_WEIGHTS = SHARED_DATA / "weights"


def photos(n: int, megapixels: float = 1.0) -> list[bytes]:
    """About 1 MP (``megapixels``) JPEGs: the shared people photos when present, else the astronaut."""
    sources = []
    people = SHARED_DATA / "faces" / "people"
    for path in sorted(people.glob("img*.jpg")) if people.exists() else []:
        sources.append(Image.open(path).convert("RGB"))
    sources = sources or [Image.fromarray(data.astronaut())]
    out = []
    for i in range(n):
        im = sources[i % len(sources)]
        scale = (megapixels * 1e6 / (im.width * im.height)) ** 0.5
        buf = io.BytesIO()
        im.resize((int(im.width * scale), int(im.height * scale))).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def random_production_weights(folder: Path) -> None:
    """Randomly initialised ResNet-50 RetinaFace and FAN in the hub layout (timing only)."""
    from face_alignment.models import FAN
    from retinaface.network import RetinaFace

    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / WEIGHTS_BY_KEY["fan"].filename).exists():
        torch.save(FAN(4).state_dict(), folder / WEIGHTS_BY_KEY["fan"].filename)
    net = RetinaFace(name="Resnet50", pretrained=False, return_layers={"layer2": 1, "layer3": 2, "layer4": 3},
                     in_channels=256, out_channels=256)
    torch.save(net.state_dict(), folder / WEIGHTS_BY_KEY["retinaface_resnet50"].filename)


def decode(blob: bytes):
    return decode_upload(blob, max_bytes=50 << 20, max_pixels=4e7, min_side=64)


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_backend(label: str, pre: Preprocessor, offline: Preprocessor, blobs: list[bytes], batches: list[int],
                  repeat: int, random_weights: bool, device: str) -> list[tuple]:
    rgbs = [decode(b).rgb for b in blobs]
    # Boxes and rotations for the landmark stage come from this backend, or from the offline one
    # when the networks carry random weights (their own boxes would be noise).
    source = offline if random_weights else pre
    found = source.detect_batch(rgbs)
    ok = [i for i, d in enumerate(found) if isinstance(d, Detection)]
    rows = []
    base: dict[str, float] = {}
    for batch in batches:
        idx = [ok[i % len(ok)] for i in range(batch)]
        imgs = [rgbs[i] for i in idx]
        boxes = [found[i].face.box for i in idx]
        turns = [found[i].rotation for i in idx]
        stages = {
            "decode": lambda idx=idx: [decode(blobs[i]) for i in idx],
            "detect": lambda imgs=imgs: pre.detector.detect_batch(imgs),
            # The preprocessor's search: the detector pass, levelling, and the padded/turned tries where none is found.
            "find face": lambda imgs=imgs: source.detect_batch(imgs) if random_weights else pre.detect_batch(imgs),
            "landmarks": lambda imgs=imgs, boxes=boxes: pre.mesh.landmarks_batch(imgs, boxes),
        }
        if not random_weights:
            stages["align+crops"] = lambda imgs=imgs, boxes=boxes, turns=turns: pre.align_batch(imgs, boxes, turns)
            stages["whole path"] = lambda idx=idx: pre.run_batch(
                [decode(blobs[i]).rgb for i in idx])
        for stage, fn in stages.items():
            seconds = timed(fn, repeat)
            per_image = seconds / batch
            key = stage
            if batch == batches[0]:
                base[key] = per_image
            rows.append((label + (" (random weights)" if random_weights else ""), device, stage, batch,
                         1000 * per_image, 1 / per_image, base[key] / per_image))
    return rows


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--photos", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--devices", default="cpu,cuda")
    parser.add_argument("--megapixels", type=float, default=1.0, help="photo size (bench/gpu.sh --cpu-smoke: small)")
    parser.add_argument("--backends", choices=("all", "production", "offline"), default="all",
                        help="production: only the RetinaFace-R50 + FAN rows (bench/gpu.sh); offline: only the "
                             "BlazeFace and RetinaFace MobileNet rows")
    parser.add_argument("--rows", type=Path, default=None, help="append the rows as JSON lines (bench/gpu.sh)")
    return parser.parse_args()


def mobilenet_rows(offline: Preprocessor, blobs: list[bytes], batches: list[int], repeat: int,
                   devices: list[str]) -> list[tuple]:
    """RetinaFace MobileNet-0.25 with its real weights and FaceMesh landmarks, on each device."""
    rows = []
    for device in devices:
        pre = Preprocessor(regions=ALL_REGIONS, detector="retinaface", landmarker="mediapipe", device=device)
        rows += bench_backend("retinaface-mobilenet+facemesh", pre, offline, blobs, batches, repeat, False, device)
        pre.close()
    return rows


def production_rows(offline: Preprocessor, blobs: list[bytes], batches: list[int], repeat: int,
                    devices: list[str], production_present: Path | None) -> list[tuple]:
    """RetinaFace-R50 and FAN on each device; on randomly initialised weights when their files are absent."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if not production_present:
            saved = os.environ.pop("GESTALT_WEIGHTS_DIR", None)
            os.environ["TORCH_HOME"] = tmp
            random_production_weights(Path(tmp) / "hub" / "checkpoints")
        for device in devices:
            pre = Preprocessor(regions=ALL_REGIONS, detector="retinaface", landmarker="fan", device=device,
                               verify_weights=bool(production_present))
            rows += bench_backend("retinaface-r50+fan", pre, offline, blobs, batches, repeat,
                                  not production_present, device)
            pre.close()
        if not production_present and saved:
            os.environ["GESTALT_WEIGHTS_DIR"] = saved
    return rows


def print_rows(rows: list[tuple]) -> None:
    table = Table(title=f"preprocessing, ~1 MP photos, torch threads {torch.get_num_threads()}")
    for col in ("backend", "device", "stage", "batch", "ms/image", "images/s", "speed-up vs batch 1"):
        table.add_column(col, justify="right" if col not in ("backend", "device", "stage") else "left")
    for backend, device, stage, batch, ms, ips, speedup in rows:
        table.add_row(backend, device, stage, str(batch), f"{ms:.1f}", f"{ips:.1f}", f"{speedup:.2f}x")
    console.print(table)


def append_rows(path: Path, rows: list[tuple], batches: list[int]) -> None:
    """The rows as JSON lines (bench/gpu.sh reads them)."""
    import json

    with path.open("a") as fh:
        for backend, device, stage, batch, ms, ips, speedup in rows:
            fh.write(json.dumps({"bench": "preprocess", "what": f"{backend}, {device}, {stage}, batch {batch}",
                                 "value": round(ips, 1), "unit": "images/s",
                                 "note": f"{ms:.2f} ms/image, {speedup:.2f}x vs batch {batches[0]}"}) + "\n")


def main() -> None:
    args = parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    devices = [d for d in args.devices.split(",") if d == "cpu" or torch.cuda.is_available()]
    blobs = photos(max(args.photos, max(batches)), args.megapixels)
    offline = Preprocessor(regions=ALL_REGIONS, detector="mediapipe", landmarker="mediapipe")
    rows = [] if args.backends == "production" else \
        bench_backend("blazeface+facemesh", offline, offline, blobs, batches, args.repeat, False, "cpu")

    if (SHARED_WEIGHTS / "retinaface_mobilenet0.25.pth").is_file() and "GESTALT_WEIGHTS_DIR" not in os.environ:
        os.environ["GESTALT_WEIGHTS_DIR"] = str(SHARED_WEIGHTS)
    production_present = locate(WEIGHTS_BY_KEY["retinaface_resnet50"]) and locate(WEIGHTS_BY_KEY["fan"])
    if args.backends != "production" and locate(WEIGHTS_BY_KEY["retinaface_mobilenet"]) and \
            not locate(WEIGHTS_BY_KEY["retinaface_resnet50"]):
        rows += mobilenet_rows(offline, blobs, batches, args.repeat, devices)
    if args.backends != "offline":
        rows += production_rows(offline, blobs, batches, args.repeat, devices, production_present)

    print_rows(rows)
    if args.rows:
        append_rows(args.rows, rows, batches)
    whole = [r for r in rows if r[0] == "blazeface+facemesh" and r[2] in ("decode", "detect", "landmarks",
                                                                            "align+crops") and r[3] == batches[0]]
    if whole:
        console.print(f"offline path at batch {batches[0]}: decode+detect+landmarks+align+crops = "
                      f"{sum(r[4] for r in whole):.1f} ms per photo (target under 40 ms on 2 CPU cores)")


if __name__ == "__main__":
    try:
        main()
    except ImageRejected as exc:
        sys.exit(f"a benchmark photo was rejected: {exc.reason}")

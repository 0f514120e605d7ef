"""Faces found and aligned on real photos, their close-ups, padded copies and 90/180/270-degree turns.

Every photo of ``../shared/data/faces/people`` and ``faces/orl`` is shown to the preprocessor
(``Preprocessor.run_batch``, the workers' batched path) as:

* ``original``: as stored (people photos are first scaled to at most ``MAX_SIDE`` px, for time);
* ``close-up``: a square crop in which the face (jaw to jaw, chin to the hairline estimated as
  half the brow-to-chin height above the brows) fills ``CLOSE_UP_FILL`` of the side, resized to
  ``CLOSE_UP_SIDE`` px: a face that fills the frame;
* ``padded``: the photo on a grey canvas with a ``PAD_MARGIN`` margin on each side;

each upright and turned by 90, 180 and 270 degrees (``np.rot90``, counter-clockwise as shown).

A photo counts as *found* when the detector finds a face, *aligned* when the whole path gives
aligned crops (landmarks and the quality gate passed), and *on the face* when the aligned face's
eye centres, mapped back to the original photo, lie within ``SAME_FACE`` inter-ocular distances
of the reference eyes (the main face of the original photo).

The close-up boxes and reference eyes are computed once and kept in ``--boxes`` (JSON), so that
runs on two commits show the preprocessor exactly the same images.

Usage: python bench/face_variants.py [--detectors mediapipe,retinaface] [--boxes FILE] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shared.ml.preprocess.imaging import ImageRejected  # noqa: E402
from shared.ml.preprocess.landmarks import five_points  # noqa: E402
from shared.ml.preprocess.pipeline import NO_FACE, Preprocessor  # noqa: E402
from shared.ml.preprocess.quality import IMAGE_TOO_SMALL, reason_kind  # noqa: E402

SHARED_DATA = Path(os.environ.get("GESTALT_SHARED_DATA", ROOT.parent / "shared" / "data"))
FACES = SHARED_DATA / "faces"
WEIGHTS = SHARED_DATA / "weights"
MAX_SIDE = 1280
CLOSE_UP_FILL = 0.9
CLOSE_UP_SIDE = 512
PAD_MARGIN = 0.25
SAME_FACE = 0.5
TURNS = (0, 1, 2, 3)  # np.rot90 counts
VARIANTS = ("original", "close-up", "padded")
BATCH = 16
console = Console()


def load_photos(limit: int | None = None, orl_every: int = 1) -> list[tuple[str, np.ndarray]]:
    """(name, RGB) of every people photo (scaled to ``MAX_SIDE``) and every ``orl_every``-th ORL photo."""
    out = []
    for path in sorted((FACES / "people").glob("*.jpg")):
        im = Image.open(path).convert("RGB")
        scale = min(1.0, MAX_SIDE / max(im.size))
        if scale < 1:
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
        out.append((f"people/{path.name}", np.asarray(im)))
    orl = sorted((FACES / "orl").glob("s*/*.pgm"), key=lambda p: (int(p.parent.name[1:]), int(p.stem)))
    for path in orl[::orl_every]:
        out.append((f"orl/{path.parent.name}/{path.name}", np.asarray(Image.open(path).convert("RGB"))))
    return out[:limit] if limit else out


def face_box(landmarks: np.ndarray) -> tuple[float, float, float, float]:
    """Jaw to jaw, chin to the hairline (half the brow-to-chin height above the brows)."""
    brow = landmarks[17:27, 1].min()
    chin = landmarks[8, 1]
    return (float(landmarks[:17, 0].min()), float(brow - 0.5 * (chin - brow)),
            float(landmarks[:17, 0].max()), float(chin))


def close_up_square(box: tuple, shape: tuple) -> tuple[int, int, int]:
    """(x0, y0, side) of the square in which ``box`` fills ``CLOSE_UP_FILL``, kept inside the photo."""
    h, w = shape[:2]
    x0, y0, x1, y1 = box
    side = int(round(max(x1 - x0, y1 - y0) / CLOSE_UP_FILL))
    side = min(side, h, w)
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    sx = int(round(min(max(cx - side / 2, 0), w - side)))
    sy = int(round(min(max(cy - side / 2, 0), h - side)))
    return sx, sy, side


def references(photos: list[tuple[str, np.ndarray]], path: Path) -> dict:
    """name -> {"eyes": 2 x 2 or None, "square": (x0, y0, side) or None}, computed once and kept in ``path``."""
    if path.exists():
        return json.loads(path.read_text())
    pre = Preprocessor(detector="mediapipe", landmarker="mediapipe")
    refs = {}
    for name, rgb in photos:
        entry = {"eyes": None, "square": None}
        try:
            found = pre.detect(rgb)
            frame_rgb, to_photo = _frame_of(rgb, found.rotation)
            lm = pre.mesh.landmarks(frame_rgb, found.face.box)
            if lm is not None:
                lm = to_photo(lm)
                entry = {"eyes": five_points(lm)[:2].tolist(), "square": close_up_square(face_box(lm), rgb.shape)}
        except ImageRejected:
            pass
        refs[name] = entry
    pre.close()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(refs))
    return refs


def _frame_of(rgb: np.ndarray, angle: float):
    """The photo turned by ``angle`` as the preprocessor turns it, and the map of its points back."""
    h, w = rgb.shape[:2]
    m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
    cos, sin = abs(m[0, 0]), abs(m[0, 1])
    fw, fh = int(round(h * sin + w * cos)), int(round(h * cos + w * sin))
    m[0, 2] += fw / 2 - w / 2
    m[1, 2] += fh / 2 - h / 2
    inverse = cv2.invertAffineTransform(m)
    image = rgb if angle == 0 else cv2.warpAffine(rgb, m, (fw, fh))
    return image, lambda p: np.asarray(p, np.float64) @ inverse[:, :2].T + inverse[:, 2]


def variant(rgb: np.ndarray, kind: str, square) -> tuple[np.ndarray, callable] | None:
    """The variant image and the map of its points back to the original photo's pixels (None: no close-up)."""
    if kind == "original":
        return rgb, lambda p: np.asarray(p, np.float64)
    if kind == "padded":
        h, w = rgb.shape[:2]
        m = int(round(PAD_MARGIN * max(h, w)))
        out = np.full((h + 2 * m, w + 2 * m, 3), 128, np.uint8)
        out[m:m + h, m:m + w] = rgb
        return out, lambda p, m=m: np.asarray(p, np.float64) - m
    if square is None:
        return None
    x0, y0, side = square
    crop = rgb[y0:y0 + side, x0:x0 + side]
    scale = CLOSE_UP_SIDE / side
    out = cv2.resize(crop, (CLOSE_UP_SIDE, CLOSE_UP_SIDE), interpolation=cv2.INTER_CUBIC if scale > 1 else
                     cv2.INTER_AREA)
    return out, lambda p, s=scale, x0=x0, y0=y0: np.asarray(p, np.float64) / s + (x0, y0)


def turned(rgb: np.ndarray, k: int, back):
    """``np.rot90(rgb, k)`` and the map of its points back through ``back``."""
    h, w = rgb.shape[:2]
    out = np.ascontiguousarray(np.rot90(rgb, k))

    def unturn(p, k=k, h=h, w=w):
        p = np.asarray(p, np.float64).copy()
        for j in reversed(range(k)):  # undo quarter turn j: (x, y) -> (y, width - 1 - x) on its input
            width = w if j % 2 == 0 else h
            x, y = p[:, 0].copy(), p[:, 1].copy()
            p[:, 0], p[:, 1] = width - 1 - y, x
        return back(p)

    return out, unturn


def measure(pre: Preprocessor, photos, refs, progress: bool = False) -> list[dict]:
    """One record per (photo, variant, turn): found, aligned, on the face, reason."""
    jobs = []
    for name, rgb in photos:
        for kind in VARIANTS:
            made = variant(rgb, kind, refs[name]["square"])
            if made is None:
                continue
            for k in TURNS:
                jobs.append((name, kind, k, *turned(made[0], k, made[1])))
    records = []
    for i in range(0, len(jobs), BATCH):
        chunk = jobs[i:i + BATCH]
        results = pre.run_batch([j[3] for j in chunk])
        if progress and (i // BATCH) % 20 == 0:
            console.print(f"  {i + len(chunk)}/{len(jobs)}", style="dim")
        for (name, kind, k, _, back), result in zip(chunk, results, strict=True):
            rec = {"photo": name, "set": name.split("/")[0], "variant": kind, "turn": 90 * k}
            if isinstance(result, ImageRejected):
                rec.update(found=result.reason not in (NO_FACE, IMAGE_TOO_SMALL), aligned=False, on_face=False,
                           reason=result.reason)
            else:
                eyes = back(five_points(result.aligned.landmarks)[:2])
                ref = refs[name]["eyes"]
                on_face = None
                if ref is not None:
                    ref = np.asarray(ref)
                    on_face = bool(np.abs(eyes - ref).max() < SAME_FACE * np.linalg.norm(ref[1] - ref[0]))
                rec.update(found=True, aligned=True, on_face=on_face, reason=None)
            records.append(rec)
    return records


def print_table(label: str, records: list[dict], seconds: float) -> None:
    table = Table(title=f"{label}: faces found and aligned ({len(records)} images, {seconds:.0f} s)")
    for col in ("set", "variant", "turn", "images", "found", "aligned", "on the face"):
        table.add_column(col, justify="left" if col in ("set", "variant") else "right")

    def row(set_name, kind, turn, recs):
        n = len(recs)
        checked = [r for r in recs if r["aligned"] and r["on_face"] is not None]
        on_face = sum(r["on_face"] for r in checked)
        table.add_row(set_name, kind, turn, str(n), f"{100 * sum(r['found'] for r in recs) / n:.1f}%",
                      f"{100 * sum(r['aligned'] for r in recs) / n:.1f}%",
                      f"{100 * on_face / len(checked):.1f}%" if checked else "-")

    for set_name in ("people", "orl"):
        for kind in VARIANTS:
            for turn in (0, 90, 180, 270):
                recs = [r for r in records if (r["set"], r["variant"], r["turn"]) == (set_name, kind, turn)]
                if recs:
                    row(set_name, kind, str(turn), recs)
        recs = [r for r in records if r["set"] == set_name]
        if recs:
            row(set_name, "all", "all", recs)
    row("both", "all", "all", records)
    console.print(table)
    reasons = Counter(reason_kind(r["reason"]) for r in records if r["reason"])
    for reason, count in reasons.most_common():
        console.print(f"  refused {count}: {reason}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--detectors", default="mediapipe,retinaface")
    parser.add_argument("--boxes", type=Path, default=Path.home() / ".cache" / "gestalt" / "face-variants.json",
                        help="close-up squares and reference eyes (made on the first run, then reused)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N photos")
    parser.add_argument("--orl-every", type=int, default=1, help="only every N-th ORL photo (a quicker run)")
    parser.add_argument("--progress", action="store_true", help="print how many images are done")
    parser.add_argument("--records", type=Path, default=None, help="write every record as JSON lines")
    args = parser.parse_args()
    if not FACES.is_dir():
        sys.exit(f"real photos not found at {FACES}")
    if (WEIGHTS / "retinaface_mobilenet0.25.pth").is_file() and "GESTALT_WEIGHTS_DIR" not in os.environ:
        os.environ["GESTALT_WEIGHTS_DIR"] = str(WEIGHTS)
    photos = load_photos(args.limit, args.orl_every)
    refs = references(photos, args.boxes)
    for detector in args.detectors.split(","):
        pre = Preprocessor(detector=detector, landmarker="mediapipe")
        start = time.perf_counter()
        records = measure(pre, photos, refs, args.progress)
        print_table(f"{pre.detector_name} + {pre.landmarker_name}", records, time.perf_counter() - start)
        if args.records:
            with args.records.open("a") as fh:
                for r in records:
                    fh.write(json.dumps({"detector": pre.detector_name, **r}) + "\n")
        pre.close()


if __name__ == "__main__":
    main()

"""Builds the data of docs/examples/screening: a synthetic screening task on real faces.

Every photo is warped with ``shared.ml.train.warps.warp_face``: half of each person's photos get
``hypertelorism`` (the positive label), the others the ``unaffected`` resampling, so only the
geometry tells the labels apart. Three manifests (image,subject,label) are written to OUT:

* ``train.csv``: ORL people s1-s30, all 10 photos each (grayscale, 92x112);
* ``orl-new-people.csv``: ORL people s31-s40, never trained on;
* ``people.csv``: the colour photos of faces/people (scaled to at most 800 px), another camera and
  population.

Usage: python docs/examples/make_screening_example.py OUT; then see docs/examples/screening/README.md.
The warps are synthetic; this is a demonstration of the report, not patient data.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import cv2
import numpy as np

from shared.ml.preprocess.imaging import ImageRejected, decode_upload
from shared.ml.preprocess.pipeline import Preprocessor
from shared.ml.train.warps import UNAFFECTED, warp_face

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "faces"
POSITIVE = "hypertelorism"
MAX_SIDE = 800


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pre = Preprocessor()
    rng = np.random.default_rng(0)
    orl = [(DATA / "orl" / f"s{s}" / f"{i}.pgm", f"s{s}", i) for s in range(1, 41) for i in range(1, 11)]
    people = sorted((DATA / "people").glob("*.jpg"))
    people = [(p, p.stem, n) for n, p in enumerate(people)  # identities unknown: one subject per photo
              if "couple" not in p.name and "many" not in p.name]
    sets = {"train": [x for x in orl if int(x[1][1:]) <= 30],
            "orl-new-people": [x for x in orl if int(x[1][1:]) > 30], "people": people}
    for name, items in sets.items():
        rows = []
        for path, subject, i in items:
            try:
                rgb = decode_upload(path.read_bytes(), max_bytes=50 * 2**20, max_pixels=4e7, min_side=32).rgb
                scale = MAX_SIDE / max(rgb.shape[:2])
                if scale < 1:
                    rgb = cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
                landmarks = pre.run(rgb).aligned.landmarks
            except ImageRejected:
                continue
            label = POSITIVE if i % 2 else UNAFFECTED
            warped, _ = warp_face(rgb, landmarks, label, 1.0, rng)
            target = out / name / f"{subject}-{path.stem}.png"
            target.parent.mkdir(exist_ok=True)
            cv2.imwrite(str(target), cv2.cvtColor(warped, cv2.COLOR_RGB2BGR))
            rows.append((f"{name}/{target.name}", subject, label))
        with (out / f"{name}.csv").open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["image", "subject", "label"])
            w.writerows(rows)
        print(f"{name}: {len(rows)} photos")
    pre.close()


if __name__ == "__main__":
    build(Path(sys.argv[1]))

"""Draw docs/regions.png: the landmarks on a real photo, the aligned template with its regions, and the crops.

Run: ``.venv/bin/python docs/make_regions_figure.py`` (uses the offline backends and
``skimage.data.astronaut()``, a public-domain NASA portrait).
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from skimage import data  # noqa: E402

from shared.ml.preprocess.alignment import TEMPLATE  # noqa: E402
from shared.ml.preprocess.pipeline import Frame, Preprocessor  # noqa: E402
from shared.ml.preprocess.regions import ALL_REGIONS, REGIONS  # noqa: E402

COLOURS = dict(zip(ALL_REGIONS, plt.get_cmap("tab10").colors, strict=False))


OUT = Path(__file__).with_name("regions.png")


def main(out: Path = OUT) -> None:
    photo = data.astronaut()
    pre = Preprocessor(regions=ALL_REGIONS, detector="mediapipe", landmarker="mediapipe")
    result = pre.run(photo)
    pre.close()
    a = result.aligned
    fig = plt.figure(figsize=(14, 6.2), dpi=110)
    grid = fig.add_gridspec(2, 6, width_ratios=[1.4, 1.4, 0.6, 0.6, 0.6, 0.6])

    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(photo)
    x0, y0, x1, y1 = Frame.turned(photo.shape, result.detection.rotation).to_photo(
        [[result.face.box[0], result.face.box[1]], [result.face.box[2], result.face.box[3]]]).ravel()
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="gold", lw=1.5))
    ax.scatter(a.landmarks[:, 0], a.landmarks[:, 1], s=6, c="lime")
    ax.set_xlim(x0 - 40, x1 + 40)
    ax.set_ylim(y1 + 40, y0 - 40)
    ax.set_title(f"photo: box and 68 landmarks\n({pre.detector_name}, {pre.landmarker_name})", fontsize=9)
    ax.axis("off")

    ax = fig.add_subplot(grid[:, 1])
    ax.imshow(a.aligned_rgb)
    canvas = a.alignment.apply(a.landmarks)
    ax.scatter(canvas[:, 0], canvas[:, 1], s=5, c="lime")
    ax.scatter(TEMPLATE[:, 0], TEMPLATE[:, 1], s=40, marker="+", c="red", label="template points")
    for name, (bx0, by0, bx1, by1) in REGIONS.items():
        ax.add_patch(Rectangle((bx0, by0), bx1 - bx0, by1 - by0, fill=False, ec=COLOURS[name], lw=1.2))
        ax.text(bx0 + 1, by0 + 5, name, color=COLOURS[name], fontsize=6)
    ax.set_title("aligned 200x200 canvas, template and regions", fontsize=9)
    ax.legend(loc="lower right", fontsize=6)
    ax.axis("off")

    for k, name in enumerate(ALL_REGIONS):
        ax = fig.add_subplot(grid[k // 4, 2 + k % 4])
        ax.imshow(a.crops[name], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{name} (100x100)", fontsize=8, color=COLOURS[name])
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

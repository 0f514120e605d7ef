"""The report's PNG plots: confusion matrix, top-k curve, ROC curve, reliability diagram, composite faces."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shared.ml.evaluate.inputs import EvalInput, calls, positive_index  # noqa: E402
from shared.ml.evaluate.text import pct  # noqa: E402


def write_plots(inp: EvalInput, metrics: dict, out: Path) -> dict[str, str]:
    """Every plot that applies, written to ``out``; returns {plot: file name}."""
    files = {"confusion": _confusion_matrix(inp, out)}
    if metrics["topk_curve"]:
        files["topk"] = _topk_curve(metrics["topk_curve"], out)
    if len(inp.class_names) == 2 and metrics["binary"]["auc"]["n"]:
        files["roc"] = _roc_curve(inp, metrics["binary"], out)
    files["reliability"] = _reliability(metrics["calibration"], out)
    if inp.aligned is not None and len(inp.aligned):
        files["composites"] = _composites(inp, out)
    return files


def _confusion_matrix(inp: EvalInput, out: Path) -> str:
    n_classes = len(inp.class_names)
    cm = np.zeros((n_classes, n_classes), int)
    np.add.at(cm, (inp.labels, calls(inp)), 1)
    size = min(14, 3 + 0.25 * n_classes)
    fig, ax = plt.subplots(figsize=(max(size, 4), max(size, 4)))
    ax.imshow(cm, cmap="Blues")
    if n_classes <= 40:
        ax.set_xticks(range(n_classes), inp.class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n_classes), inp.class_names, fontsize=7)
        if n_classes <= 12:
            for (i, j), v in np.ndenumerate(cm):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xlabel("called (at the threshold)" if n_classes == 2 else "predicted (top-1)")
    ax.set_ylabel("diagnosed")
    ax.set_title("Confusion matrix")
    return _save(fig, out, "confusion_matrix.png", tight=True)


def _topk_curve(curve: list[float], out: Path) -> str:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(range(1, len(curve) + 1), [100 * c for c in curve], marker="o", ms=3)
    ax.set_xlabel("k")
    ax.set_ylabel("top-k accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("Top-k accuracy")
    return _save(fig, out, "topk_curve.png", tight=True)


def _roc_curve(inp: EvalInput, b: dict, out: Path) -> str:
    """The ROC curve of the positive class's score, with the operating threshold marked."""
    from sklearn.metrics import roc_curve

    pos = positive_index(inp)
    fpr, tpr, _ = roc_curve(inp.labels == pos, inp.aggregate()[:, pos])
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot(fpr, tpr, label=f"AUC {pct(b['auc'], 'n/a', 3)}")
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8)
    if b["sensitivity"]["n"] and b["specificity"]["n"]:
        ax.plot(1 - b["specificity"]["value"], b["sensitivity"]["value"], "o", color="C3",
                label=f"threshold {b['threshold']:.3f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC: {b['positive']} against {b['negative']}")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, out, "roc_curve.png", tight=True)


def _reliability(cal: dict, out: Path) -> str:
    """Observed rate against predicted probability per bin, each bin annotated with its number of images."""
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="perfect calibration")
    if cal["bins"]:
        conf = [r["confidence"] for r in cal["bins"]]
        obs = [r["observed"] for r in cal["bins"]]
        ax.plot(conf, obs, marker="o", label=f"model (ECE {cal['ece']:.3f})")
        for c, o, r in zip(conf, obs, cal["bins"], strict=True):
            ax.annotate(str(r["n"]), (c, o), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(f"predicted {cal['of']}")
    ax.set_ylabel("observed rate")
    ax.set_title("Reliability diagram (images per bin)")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, out, "reliability.png", tight=True)


def _composites(inp: EvalInput, out: Path) -> str:
    """The mean aligned face of each diagnosed class, in a grid of up to six columns."""
    present = sorted(np.unique(inp.labels))
    cols = min(6, len(present))
    rows = int(np.ceil(len(present) / cols))
    # At least 6 inches wide, so the title fits on one line; constrained layout keeps it inside the figure.
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 2.2 * cols), 2.5 * rows + 0.6), squeeze=False,
                             layout="constrained")
    for ax in axes.ravel():
        ax.axis("off")
    for ax, c in zip(axes.ravel(), present, strict=False):
        ax.imshow(inp.aligned[inp.labels == c].astype(np.float64).mean(axis=0), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"{inp.class_names[c]} (n={int((inp.labels == c).sum())})", fontsize=9)
    fig.suptitle("Composite faces (mean of aligned faces)", fontsize=12)
    return _save(fig, out, "composite_faces.png", tight=False, dpi=100)


def _save(fig, out: Path, name: str, tight: bool, dpi: int = 110) -> str:
    """Write ``fig`` to ``out / name`` and close it; returns ``name``."""
    if tight:
        fig.tight_layout()
    fig.savefig(out / name, dpi=dpi)
    plt.close(fig)
    return name

"""The evaluation report: metrics.json, report.md, report.html and PNG plots in one folder."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from jinja2 import Environment, PackageLoader, select_autoescape  # noqa: E402

from shared.ml import evaluation as ev  # noqa: E402

KS = (1, 5, 10)
CURVE_MAX_K = 30


@dataclass
class EvalInput:
    """Everything the report is computed from."""

    model_name: str
    class_names: list[str]
    regions: list[str]
    region_probs: np.ndarray  # N x R x C
    labels: np.ndarray  # N
    subjects: list[str]
    data_source: str
    data_hash: str
    split: str
    rejected: list[tuple[str, str]] = field(default_factory=list)
    aligned: np.ndarray | None = None  # N x H x W uint8 aligned faces, for composites
    baseline_accuracy: float | None = None
    baseline_n: int | None = None
    positive: str | None = None  # binary models: the positive class
    resamples: int = ev.DEFAULT_RESAMPLES
    permutations: int = 100_000
    seed: int = 0


def compute(inp: EvalInput) -> dict:
    """All figures of the report, as plain JSON-able values."""
    agg = inp.region_probs.mean(axis=1)
    labels = inp.labels
    n_classes = len(inp.class_names)
    ks = tuple(k for k in KS if k <= n_classes) or (1,)
    table = ev.topk_table(agg, labels, ks, inp.resamples, inp.seed)
    metrics: dict = {
        "model": inp.model_name, "data": {"source": inp.data_source, "hash": inp.data_hash, "split": inp.split,
                                          "images": int(len(labels)), "subjects": len(set(inp.subjects)),
                                          "disorders": int(len(np.unique(labels))), "rejected": len(inp.rejected)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "resamples": inp.resamples, "permutations": inp.permutations, "seed": inp.seed,
        "per_image": {k: v.as_dict() for k, v in table["per_image"].items()},
        "macro": {k: v.as_dict() for k, v in table["macro"].items()},
        "permutation_p": {f"top{k}": ev.permutation_pvalue(agg, labels, k, inp.permutations, inp.seed) for k in ks},
        "regions": {},
        "topk_curve": [float(ev.topk_hits(agg, labels, k).mean()) for k in range(1, min(CURVE_MAX_K, n_classes) + 1)],
        "rejected": [{"image": i, "reason": r} for i, r in inp.rejected],
    }
    for i, region in enumerate(inp.regions):
        metrics["regions"][region] = {f"top{k}": ev.bootstrap_mean(ev.topk_hits(inp.region_probs[:, i], labels, k),
                                                                   inp.resamples, inp.seed).as_dict() for k in ks}
    metrics["regions"]["aggregate"] = metrics["per_image"]
    if n_classes == 2:
        pos = inp.class_names.index(inp.positive) if inp.positive else 0
        binary = ev.binary_metrics(agg.argmax(axis=1) == pos, labels == pos, inp.resamples, inp.seed)
        metrics["binary"] = {"positive": inp.class_names[pos], **{k: v.as_dict() for k, v in binary.items()}}
    if inp.baseline_accuracy is not None:
        n2 = inp.baseline_n or len(labels)
        hits = int(ev.topk_hits(agg, labels, 1).sum())
        z = ev.two_proportion_ztest(hits, len(labels), inp.baseline_accuracy, n2)
        metrics["baseline"] = {"accuracy": inp.baseline_accuracy, "n": n2, "ours": z.p1, "z": z.z, "p": z.p}
    return metrics


def _plots(inp: EvalInput, metrics: dict, out: Path) -> dict[str, str]:
    files = {}
    agg = inp.region_probs.mean(axis=1)
    n_classes = len(inp.class_names)

    cm = np.zeros((n_classes, n_classes), int)
    np.add.at(cm, (inp.labels, agg.argmax(axis=1)), 1)
    size = min(14, 3 + 0.25 * n_classes)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(cm, cmap="Blues")
    if n_classes <= 40:
        ax.set_xticks(range(n_classes), inp.class_names, rotation=90, fontsize=7)
        ax.set_yticks(range(n_classes), inp.class_names, fontsize=7)
        if n_classes <= 12:
            for (i, j), v in np.ndenumerate(cm):
                ax.text(j, i, str(v), ha="center", va="center", fontsize=8)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("diagnosed")
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=110)
    plt.close(fig)
    files["confusion"] = "confusion_matrix.png"

    fig, ax = plt.subplots(figsize=(6, 4))
    curve = metrics["topk_curve"]
    ax.plot(range(1, len(curve) + 1), [100 * c for c in curve], marker="o", ms=3)
    ax.set_xlabel("k")
    ax.set_ylabel("top-k accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title("Top-k accuracy")
    fig.tight_layout()
    fig.savefig(out / "topk_curve.png", dpi=110)
    plt.close(fig)
    files["topk"] = "topk_curve.png"

    if inp.aligned is not None and len(inp.aligned):
        present = sorted(np.unique(inp.labels))
        cols = min(8, len(present))
        rows = int(np.ceil(len(present) / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
        for ax in axes.ravel():
            ax.axis("off")
        for ax, c in zip(axes.ravel(), present, strict=False):
            ax.imshow(inp.aligned[inp.labels == c].astype(np.float64).mean(axis=0), cmap="gray")
            ax.set_title(f"{inp.class_names[c]} (n={int((inp.labels == c).sum())})", fontsize=7)
        fig.suptitle("Composite faces (mean of aligned faces)")
        fig.tight_layout()
        fig.savefig(out / "composite_faces.png", dpi=72)
        plt.close(fig)
        files["composites"] = "composite_faces.png"
    return files




def _pct(v: dict) -> str:
    return f"{100 * v['value']:.1f}% ({100 * v['low']:.1f}–{100 * v['high']:.1f})"


def write_report(inp: EvalInput, out: Path) -> dict:
    """Compute every figure and write the report folder; returns the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = compute(inp)
    files = _plots(inp, metrics, out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    # Autoescape for HTML only: Markdown has no escaping, and the values are numbers and our own labels.
    env = Environment(loader=PackageLoader("shared.ml", "templates"),
                      autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False))
    for name in ("report.md", "report.html"):
        (out / name).write_text(env.get_template(name + ".j2").render(m=metrics, files=files, pct=_pct))
    return metrics

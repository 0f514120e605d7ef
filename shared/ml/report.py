"""The evaluation report: metrics.json, report.md, report.html and PNG plots in one folder."""
from __future__ import annotations

import json
from collections.abc import Callable
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
    region_probs: np.ndarray  # N x R x C: the ensemble's members (regions, then the identity member if any)
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
    images: list[str] | None = None  # per image: its file, for predictions.csv
    original_labels: list[str] | None = None  # per image: the test set's own label (before the model's mapping)
    label_map: dict[str, str] = field(default_factory=dict)  # original label -> class, as applied
    threshold: float | None = None  # binary: operating threshold on the positive probability
    threshold_source: str = ""
    prevalence: float | None = None  # binary: PPV/NPV also at this prevalence
    preprocessing: dict = field(default_factory=dict)  # detector/landmarker names and weight hashes
    temperature: float | None = None  # the calibration temperature applied to the scores, if any
    # (image index, class index) -> RGB overlay of the aligned face with that class's heatmap, for the error gallery
    heatmap: Callable[[int, int], np.ndarray] | None = None
    # Each member's weight in the aggregate (sums to 1); None: the members' plain mean.
    member_weights: list[float] | None = None
    # Per image, how unlike the model's training photos (shared.ml.identity.OODReference.score), if known.
    ood: list[dict] | None = None

    def aggregate(self) -> np.ndarray:
        """``N x C``: the members combined as the model combines them."""
        if self.member_weights is None:
            return self.region_probs.mean(axis=1)
        return np.einsum("nrc,r->nc", self.region_probs, np.asarray(self.member_weights, np.float64))


def _estimates(d: dict) -> dict:
    """Estimates and nested dicts of them as plain values (NaN becomes None, valid JSON)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, ev.Estimate):
            v = v.as_dict()
        if isinstance(v, dict):
            v = _estimates(v)
        elif isinstance(v, float) and not np.isfinite(v):
            v = None
        out[k] = v
    return out


def positive_index(inp: EvalInput) -> int:
    return inp.class_names.index(inp.positive) if inp.positive in inp.class_names else 0


def calls(inp: EvalInput) -> np.ndarray:
    """The class each image is called: argmax, or for two classes the positive class at the threshold."""
    agg = inp.aggregate()
    if len(inp.class_names) != 2:
        return agg.argmax(axis=1)
    pos = positive_index(inp)
    thr = ev.DEFAULT_THRESHOLD if inp.threshold is None else inp.threshold
    return np.where(agg[:, pos] >= thr, pos, 1 - pos)


def compute(inp: EvalInput) -> dict:
    """All figures of the report, as plain JSON-able values."""
    agg = inp.aggregate()
    labels = inp.labels
    n_classes = len(inp.class_names)
    ks = tuple(k for k in KS if k <= n_classes) or (1,)
    table = ev.topk_table(agg, labels, ks, inp.resamples, inp.seed)
    for k in ks:  # per-image proportions: exact Clopper-Pearson intervals
        table["per_image"][f"top{k}"] = ev.proportion_of(ev.topk_hits(agg, labels, k))
    binary = n_classes == 2
    metrics: dict = {
        "model": inp.model_name, "data": {"source": inp.data_source, "hash": inp.data_hash, "split": inp.split,
                                          "images": int(len(labels)), "subjects": len(set(inp.subjects)),
                                          "disorders": int(len(np.unique(labels))), "rejected": len(inp.rejected)},
        "created": datetime.now(UTC).isoformat(timespec="seconds"), "preprocessing": inp.preprocessing,
        "label_map": inp.label_map, "temperature": inp.temperature,
        "member_weights": dict(zip(inp.regions, map(float, inp.member_weights), strict=True))
        if inp.member_weights is not None else None,
        "ood": _ood_summary(inp.ood),
        "resamples": inp.resamples, "permutations": inp.permutations, "seed": inp.seed,
        "per_image": {k: v.as_dict() for k, v in table["per_image"].items()},
        "macro": {k: v.as_dict() for k, v in table["macro"].items()},
        "permutation_p": {f"top{k}": ev.permutation_pvalue(agg, labels, k, inp.permutations, inp.seed) for k in ks},
        "regions": {},
        # Two classes: top-2 is always 100%, so no curve.
        "topk_curve": [] if binary else [float(ev.topk_hits(agg, labels, k).mean())
                                         for k in range(1, min(CURVE_MAX_K, n_classes) + 1)],
        "rejected": [{"image": i, "reason": r} for i, r in inp.rejected],
        "skipped_summary": _skipped_counts(inp.rejected),
    }
    if binary:
        pos = positive_index(inp)
        thr = ev.DEFAULT_THRESHOLD if inp.threshold is None else float(inp.threshold)
        truth = labels == pos
        screen = ev.screening_metrics(agg[:, pos], truth, thr, inp.prevalence, inp.resamples, inp.seed)
        metrics["binary"] = {"positive": inp.class_names[pos], "negative": inp.class_names[1 - pos],
                             "threshold_source": inp.threshold_source or "the default 0.5: the checkpoint stores none",
                             **_estimates(screen)}
        metrics["calibration"] = {"of": f"P({inp.class_names[pos]})", **ev.calibration(agg[:, pos], truth)}
        for i, region in enumerate(inp.regions):
            metrics["regions"][region] = _estimates(ev.screening_metrics(
                inp.region_probs[:, i, pos], truth, thr, None, inp.resamples, inp.seed))
        metrics["regions"]["aggregate"] = {k: v for k, v in metrics["binary"].items()}
    else:
        for i, region in enumerate(inp.regions):
            metrics["regions"][region] = {f"top{k}": ev.proportion_of(ev.topk_hits(inp.region_probs[:, i], labels, k))
                                          .as_dict() for k in ks}
        metrics["regions"]["aggregate"] = metrics["per_image"]
        top = agg.argmax(axis=1)
        metrics["calibration"] = {"of": "top-1 confidence", **ev.calibration(agg.max(axis=1), top == labels)}
    if inp.baseline_accuracy is not None:
        n2 = inp.baseline_n or len(labels)
        # Top-1, or for a two-class model its calls at the threshold.
        hits = int((calls(inp) == labels).sum()) if binary else int(ev.topk_hits(agg, labels, 1).sum())
        z = ev.two_proportion_ztest(hits, len(labels), inp.baseline_accuracy, n2)
        metrics["baseline"] = {"accuracy": inp.baseline_accuracy, "n": n2, "ours": z.p1, "z": z.z, "p": z.p}
    return metrics


def _skipped_counts(rejected: list[tuple[str, str]]) -> list[dict]:
    from collections import Counter

    from shared.ml.training import reason_kind

    return [{"reason": k, "n": n} for k, n in Counter(reason_kind(r) for _, r in rejected).most_common()]


def _plots(inp: EvalInput, metrics: dict, out: Path) -> dict[str, str]:
    files = {}
    agg = inp.aggregate()
    n_classes = len(inp.class_names)
    binary = n_classes == 2

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
    ax.set_xlabel("called (at the threshold)" if binary else "predicted (top-1)")
    ax.set_ylabel("diagnosed")
    ax.set_title("Confusion matrix")
    fig.tight_layout()
    fig.savefig(out / "confusion_matrix.png", dpi=110)
    plt.close(fig)
    files["confusion"] = "confusion_matrix.png"

    curve = metrics["topk_curve"]
    if curve:
        fig, ax = plt.subplots(figsize=(6, 4))
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

    if binary and metrics["binary"]["auc"]["n"]:
        from sklearn.metrics import roc_curve

        pos = positive_index(inp)
        fpr, tpr, _ = roc_curve(inp.labels == pos, agg[:, pos])
        b = metrics["binary"]
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
        fig.tight_layout()
        fig.savefig(out / "roc_curve.png", dpi=110)
        plt.close(fig)
        files["roc"] = "roc_curve.png"

    cal = metrics["calibration"]
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
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)
    files["reliability"] = "reliability.png"

    if inp.aligned is not None and len(inp.aligned):
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
        fig.savefig(out / "composite_faces.png", dpi=100)
        plt.close(fig)
        files["composites"] = "composite_faces.png"
    return files


def write_predictions(inp: EvalInput, path: Path) -> None:
    """One row per image: file, subject, labels, the call, the ranking and every score (aggregate and region).

    Columns: ``image, subject, original_label, label, predicted, correct, ranking`` (``class:score``
    best first, ``;``-separated), then ``score:<class>`` (aggregate) and ``<region>:<class>`` per region.
    ``gestalt stats permutation`` and ``gestalt stats mcnemar`` read it.
    """
    import csv

    agg = inp.aggregate()
    called = calls(inp)
    names = inp.class_names
    n = len(inp.labels)
    images = inp.images or [""] * n
    originals = inp.original_labels or [names[y] for y in inp.labels]
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "subject", "original_label", "label", "predicted", "correct", "ranking",
                    *(f"score:{c}" for c in names), *(f"{r}:{c}" for r in inp.regions for c in names),
                    *(["ood_percentile"] if inp.ood else [])])
        for i in range(n):
            order = np.argsort(-agg[i], kind="stable")
            w.writerow([images[i], inp.subjects[i], originals[i], names[inp.labels[i]], names[called[i]],
                        int(called[i] == inp.labels[i]), ";".join(f"{names[j]}:{agg[i, j]:.6f}" for j in order),
                        *(f"{v:.6f}" for v in agg[i]), *(f"{v:.6f}" for v in inp.region_probs[i].ravel()),
                        *([f"{inp.ood[i]['percentile']:.1f}"] if inp.ood else [])])


def _ood_summary(ood: list[dict] | None) -> dict | None:
    """How far the test photos lie from the model's training photos, against held-out training photos."""
    if not ood:
        return None
    pct = np.array([o["percentile"] for o in ood], float)
    unusual = int(sum(o["unusual"] for o in ood))
    return {"images": len(ood), "unusual": unusual, "unusual_share": unusual / len(ood),
            "median_percentile": float(np.median(pct)), "expected_median": 50.0}


def pct(v: dict | None, missing: str = "n/a", digits: int | None = None) -> str:
    """``61.3% (57.2–65.5)``; a fraction-scale figure (AUC) with ``digits``; ``missing`` when undefined."""
    if not v or not v.get("n") or v.get("value") is None:
        return missing
    if digits is not None:
        return f"{v['value']:.{digits}f} ({v['low']:.{digits}f}–{v['high']:.{digits}f})"
    return f"{100 * v['value']:.1f}% ({100 * v['low']:.1f}–{100 * v['high']:.1f})"


ERROR_GALLERY = 6  # thumbnails at most


def error_cases(inp: EvalInput, limit: int = ERROR_GALLERY) -> list[dict]:
    """The worst mistakes: for two classes the most confident false positives and false negatives (by
    P(positive), half each when both exist); otherwise the most confident wrong top-1 calls. Each with the
    class whose heatmap explains it (the positive class, or the wrongly called one)."""
    agg = inp.aggregate()
    called = calls(inp)
    if len(inp.class_names) == 2:
        pos = positive_index(inp)
        p = agg[:, pos]
        fp = sorted(np.flatnonzero((called == pos) & (inp.labels != pos)), key=lambda i: -p[i])
        fn = sorted(np.flatnonzero((called != pos) & (inp.labels == pos)), key=lambda i: p[i])
        n_fp = min(len(fp), max(limit // 2, limit - len(fn)))
        picked = [(i, "false positive") for i in fp[:n_fp]] + [(i, "false negative") for i in fn[:limit - n_fp]]
        cases = [(i, kind, pos, float(p[i])) for i, kind in picked]
    else:
        wrong = sorted(np.flatnonzero(called != inp.labels), key=lambda i: -agg[i, called[i]])
        cases = [(i, "wrong top-1", int(called[i]), float(agg[i, called[i]])) for i in wrong[:limit]]
    out = []
    for i, kind, cls, score in cases:
        out.append({"index": int(i), "kind": kind, "image": Path(inp.images[i]).name if inp.images else str(i),
                    "subject": inp.subjects[i], "true": inp.class_names[inp.labels[i]],
                    "called": inp.class_names[called[i]], "heatmap_class": inp.class_names[cls],
                    "score": round(score, 4), "_class": cls})
    return out


def _error_gallery(inp: EvalInput, out: Path) -> list[dict]:
    """PNG thumbnails (aligned face, with the heatmap when the model is at hand) in ``out/errors``."""
    if inp.aligned is None or not len(inp.aligned):
        return []
    from shared.ml.imaging import encode_png

    cases = error_cases(inp)
    if cases:
        (out / "errors").mkdir(exist_ok=True)
    for n, case in enumerate(cases, 1):
        i, cls = case.pop("index"), case.pop("_class")
        face = inp.aligned[i]
        image = inp.heatmap(i, cls) if inp.heatmap else np.repeat(face[..., None], 3, axis=2)
        case["png"] = f"errors/error-{n}.png"
        (out / case["png"]).write_bytes(encode_png(image))
    return cases


def write_report(inp: EvalInput, out: Path) -> dict:
    """Compute every figure and write the report folder; returns the metrics."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = _estimates(compute(inp))
    files = _plots(inp, metrics, out)
    metrics["error_gallery"] = _error_gallery(inp, out)
    write_predictions(inp, out / "predictions.csv")
    files["predictions"] = "predictions.csv"
    if inp.rejected:
        with (out / "skipped.csv").open("w", newline="") as fh:
            import csv

            w = csv.writer(fh)
            w.writerow(["image", "reason"])
            w.writerows(inp.rejected)
        files["skipped"] = "skipped.csv"
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    # Autoescape for HTML only: Markdown has no escaping, and the values are numbers and our own labels.
    env = Environment(loader=PackageLoader("shared.ml", "templates"),
                      autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False))
    for name in ("report.md", "report.html"):
        (out / name).write_text(env.get_template(name + ".j2").render(m=metrics, files=files, pct=pct,
                                                                     headline=headline(metrics)))
    return metrics


def headline(metrics: dict) -> list[str]:
    """The report's summary in a few lines (also printed by ``gestalt evaluate``)."""
    d = metrics["data"]
    lines = [f"{metrics['model']}: {d['images']} images of {d['subjects']} subjects ({d['rejected']} skipped)"]
    b = metrics.get("binary")
    if b:
        lines.append(f"screening {b['positive']} against {b['negative']} at threshold {b['threshold']:.3f} "
                     f"[{b['threshold_source']}]; {b['n_positive']} positive, {b['n_negative']} negative images")
        lines.append(f"correct calls {pct(b['accuracy'])}; AUC {pct(b['auc'], 'n/a (one class only)', 3)}")
        lines.append(f"sensitivity {pct(b['sensitivity'], 'n/a (no positive images)')}; "
                     f"specificity {pct(b['specificity'], 'n/a (no negative images)')}")
        lines.append(f"PPV {pct(b['ppv'])}, NPV {pct(b['npv'])} at the test prevalence "
                     f"{100 * b['test_prevalence']:.1f}%")
        if b.get("at_prevalence"):
            a = b["at_prevalence"]
            lines.append(f"PPV {pct(a['ppv'])}, NPV {pct(a['npv'])} at a prevalence of {100 * a['prevalence']:.3g}%")
    else:
        lines += [f"{k}: {pct(v)} per image, {pct(metrics['macro'][k])} per disorder"
                  for k, v in metrics["per_image"].items()]
    lines.append(f"expected calibration error ({metrics['calibration']['of']}): {metrics['calibration']['ece']:.3f}")
    return lines

"""The evaluation report: metrics.json, report.md, report.html and PNG plots in one folder.

This module computes the figures and writes the folder. The input (:class:`EvalInput`) lives in
:mod:`shared.ml.evaluate.inputs`, the plots in :mod:`shared.ml.evaluate.plots`, the summary lines in
:mod:`shared.ml.evaluate.text`.
"""
from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from jinja2 import Environment, PackageLoader, select_autoescape

from shared.ml.evaluate import statistics as ev
from shared.ml.evaluate.inputs import EvalInput, calls, positive_index
from shared.ml.evaluate.plots import write_plots
from shared.ml.evaluate.text import headline, pct

KS = (1, 5, 10)
CURVE_MAX_K = 30


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
        "by_pose": _by_pose(inp, agg, ks),
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


def _by_pose(inp: EvalInput, agg: np.ndarray, ks: tuple[int, ...]) -> dict | None:
    """Accuracy of the photos scored but flagged as turned, against the frontal ones (exact 95% intervals).

    Top-k per image for a ranking model, correct calls for a two-class one. None when the flags are unknown.
    """
    if inp.turned is None:
        return None
    turned = np.asarray(inp.turned, bool)
    correct = calls(inp) == inp.labels
    out = {}
    for group, mask in (("frontal", ~turned), ("turned", turned)):
        if len(inp.class_names) == 2:
            figures = {"accuracy": ev.proportion_of(correct[mask]).as_dict()}
        else:
            figures = {f"top{k}": ev.proportion_of(ev.topk_hits(agg[mask], inp.labels[mask], k)).as_dict()
                       for k in ks}
        out[group] = {"images": int(mask.sum()), **figures}
    return out


def _skipped_counts(rejected: list[tuple[str, str]]) -> list[dict]:
    from collections import Counter

    from shared.ml.preprocess.quality import reason_kind

    return [{"reason": k, "n": n} for k, n in Counter(reason_kind(r) for _, r in rejected).most_common()]


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
    from shared.ml.preprocess.imaging import encode_png

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
    files = write_plots(inp, metrics, out)
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
    env = Environment(loader=PackageLoader("shared.ml.evaluate", "templates"),
                      autoescape=select_autoescape(enabled_extensions=("html.j2",), default=False))
    for name in ("report.md", "report.html"):
        (out / name).write_text(env.get_template(name + ".j2").render(m=metrics, files=files, pct=pct,
                                                                     headline=headline(metrics)))
    return metrics

"""The report's figures as text: an estimate with its interval, and the summary ``gestalt evaluate`` prints."""
from __future__ import annotations


def pct(v: dict | None, missing: str = "n/a", digits: int | None = None) -> str:
    """``61.3% (57.2–65.5)``; a fraction-scale figure (AUC) with ``digits``; ``missing`` when undefined."""
    if not v or not v.get("n") or v.get("value") is None:
        return missing
    if digits is not None:
        return f"{v['value']:.{digits}f} ({v['low']:.{digits}f}–{v['high']:.{digits}f})"
    return f"{100 * v['value']:.1f}% ({100 * v['low']:.1f}–{100 * v['high']:.1f})"


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
    pose = metrics.get("by_pose")
    if pose:
        key = "accuracy" if b else "top1"
        lines.append(f"{key} of frontal photos {pct(pose['frontal'][key])} ({pose['frontal']['images']}), of photos "
                     f"flagged 'turned face: less reliable' {pct(pose['turned'][key])} ({pose['turned']['images']})")
    lines.append(f"expected calibration error ({metrics['calibration']['of']}): {metrics['calibration']['ece']:.3f}")
    return lines

"""One model on several test sets side by side (each set's full report is
:func:`shared.ml.evaluate.report.write_report`'s)."""
from __future__ import annotations

import json
from pathlib import Path

from shared.ml.evaluate.text import pct


def write_comparison(model_name: str, sets: dict[str, tuple[Path, dict]], out: Path) -> dict:
    """One model on several test sets side by side: report.md, report.html and metrics.json in ``out``
    (each set's full report is in ``out/<set>/``)."""
    out = Path(out)
    rows = []
    for name, (path, m) in sets.items():
        row = {"set": name, "source": str(path), "images": m["data"]["images"], "subjects": m["data"]["subjects"],
               "skipped": m["data"]["rejected"], "top1": m["per_image"]["top1"], "ece": m["calibration"]["ece"]}
        if m.get("binary"):
            b = m["binary"]
            row.update(accuracy=b["accuracy"], sensitivity=b["sensitivity"], specificity=b["specificity"],
                       auc=b["auc"], threshold=b["threshold"])
        else:
            row.update(top5=m["per_image"].get("top5"), macro_top1=m["macro"]["top1"])
        rows.append(row)
    binary = any("auc" in r for r in rows)
    cols = (["correct calls", "sensitivity", "specificity", "AUC"] if binary
            else ["top-1 per image", "top-5 per image", "top-1 per disorder"])

    def cells(r: dict) -> list[str]:
        if binary:
            return [pct(r["accuracy"]), pct(r["sensitivity"]), pct(r["specificity"]), pct(r["auc"], "n/a", 3)]
        return [pct(r["top1"]), pct(r.get("top5")), pct(r["macro_top1"])]

    header = ["test set", "images", "skipped", *cols, "ECE"]
    body = [[f"[{r['set']}]({r['set']}/report.md)", str(r["images"]), str(r["skipped"]), *cells(r),
             f"{r['ece']:.3f}"] for r in rows]
    md = [f"# Model {model_name} on {len(rows)} test sets", "",
          "Each set's full report is in its own folder; intervals are 95% (exact Clopper-Pearson for proportions, "
          "percentile bootstrap for the AUC).", "",
          "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(b) + " |" for b in body), ""]
    md += [f"- {r['set']}: `{r['source']}`" for r in rows]
    (out / "report.md").write_text("\n".join(md) + "\n")
    from html import escape

    html_rows = "".join(
        "<tr>" + f"<td><a href=\"{escape(r['set'])}/report.html\">{escape(r['set'])}</a></td>"
        + "".join(f"<td>{escape(c)}</td>" for c in b[1:]) + "</tr>" for r, b in zip(rows, body, strict=True))
    (out / "report.html").write_text(
        f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(model_name)}: test sets</title>"
        "<style>body{font:14px/1.45 system-ui,sans-serif;max-width:1000px;margin:2rem auto}table{border-collapse:"
        "collapse}td,th{border:1px solid #dfe3ea;padding:.3rem .6rem;text-align:left}</style></head><body>"
        f"<h1>Model {escape(model_name)} on {len(rows)} test sets</h1><table><tr>"
        + "".join(f"<th>{escape(h)}</th>" for h in header) + f"</tr>{html_rows}</table></body></html>\n")
    summary = {"model": model_name, "sets": rows}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    return summary

"""Evaluation: statistics (top-k per image and per disorder, bootstrap CIs, permutation and z-tests) and the
report (metrics.json, report.md, report.html and plots) a model's scores on a test set make."""
from shared.ml import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "EvalInput": "inputs", "write_report": "report", "write_comparison": "summary", "headline": "text",
})

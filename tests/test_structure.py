"""The layout holds: the layering contracts (import-linter), a portal that starts without torch or OpenCV,
and no module over 400 lines or function over 60 (docs/ARCHITECTURE.md).

Run ``python tests/test_structure.py`` to print the modules and functions over the limits now.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
# Everything but tests/ and migrations/.
CHECKED = ("shared", "web", "worker", "bench", "deploy", "docs")



def measure() -> tuple[dict[str, int], dict[str, int]]:
    """Lines of every module over MAX_MODULE_LINES, and of every function or method over
    MAX_FUNCTION_LINES (``path::Class.method``; from its ``def`` line to its last line)."""
    modules: dict[str, int] = {}
    functions: dict[str, int] = {}
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            text = path.read_text(encoding="utf-8")
            if len(text.splitlines()) > MAX_MODULE_LINES:
                modules[rel] = len(text.splitlines())
            _functions(ast.parse(text), rel, "", functions)
    return modules, functions


def _functions(node: ast.AST, rel: str, prefix: str, out: dict[str, int]) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = prefix + child.name
            length = child.end_lineno - child.lineno + 1
            if not isinstance(child, ast.ClassDef) and length > MAX_FUNCTION_LINES:
                out[f"{rel}::{name}"] = length
            _functions(child, rel, name + ".", out)
        else:
            _functions(child, rel, prefix, out)


def report() -> str:
    modules, functions = measure()
    lines = [f"modules over {MAX_MODULE_LINES} lines:"] + [f"  {k}: {n}" for k, n in sorted(modules.items())]
    lines += [f"functions over {MAX_FUNCTION_LINES} lines:"] + [f"  {k}: {n}" for k, n in sorted(functions.items())]
    return "\n".join(lines)


def test_sizes_within_limits():
    """No module over MAX_MODULE_LINES and no function over MAX_FUNCTION_LINES outside tests/ and
    migrations/: one that crosses a limit is split, or its logic moves to a library function."""
    modules, functions = measure()
    assert not modules and not functions, "over the size limits:\n" + report()


def test_layers_hold():
    """The contracts in pyproject.toml's [tool.importlinter]: web, worker and the CLI above the model
    lifecycle above the pure ML code and the plumbing; shared.ml imports no database, store, web or worker."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.fail("lint-imports is missing: pip install -e '.[test]'")
    r = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_no_import_circle():
    """No module imports, even inside a function, a module that imports it back, directly or around a circle
    (the strongly connected components of grimp's import graph, which import-linter builds on)."""
    import grimp
    import numpy as np
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = grimp.build_graph("shared", "web", "worker", cache_dir=None)
    modules = sorted(graph.modules)
    index = {m: i for i, m in enumerate(modules)}
    edges = np.array([(index[m], index[i]) for m in modules for i in graph.find_modules_directly_imported_by(m)])
    _, component = connected_components(coo_matrix((np.ones(len(edges)), edges.T), shape=(len(modules),) * 2),
                                        directed=True, connection="strong")
    circles = [sorted(m for m, c in zip(modules, component, strict=True) if c == k)
               for k in np.flatnonzero(np.bincount(component) > 1)]
    assert not circles, circles


def test_portal_starts_without_torch_or_opencv():
    """The portal loads torch and OpenCV only when a page needs them (a ranking, a heatmap)."""
    code = ("import sys, web; web.create_app({'TESTING': True, 'SECRET_KEY': 'k' * 32}); "
            "print('torch' in sys.modules, 'cv2' in sys.modules, 'worker' in sys.modules)")
    env = {**os.environ, "GESTALT_SECRET_KEY": os.environ.get("GESTALT_SECRET_KEY", "k" * 32)}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["False", "False", "False"], r.stdout


def test_case_pages_need_no_torch():
    """What a case page and the case API read (rankings, the active version, the gallery, the phenotype
    ranking) is numpy and SQL: torch loads only for a heatmap, a re-score or training."""
    code = ("import sys, web.results, web.phenotype, web.api, shared.services.phenotype, shared.modelops.gallery, "
            "shared.modelops.versions, "
            "shared.ml.formats.ranking, shared.ml.phenotype; print('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["False"], r.stdout


def test_cli_starts_without_torch():
    """`gestalt --help` (and `gestalt web`, `gestalt worker` before they exec) load no torch."""
    code = "import sys, shared.cli; print('torch' in sys.modules, 'worker' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["False", "False"], r.stdout


if __name__ == "__main__":
    print(report())

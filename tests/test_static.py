"""Static checks run with the tests: ruff (lint, import order, security rules) and bandit (medium and up)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-5000:]


def test_bandit_medium_and_high():
    r = subprocess.run([sys.executable, "-m", "bandit", "-q", "-c", "pyproject.toml", "-r", "shared", "web",
                        "worker", "-ll"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-5000:] + r.stderr[-2000:]

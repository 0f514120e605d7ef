"""bench/gpu.sh, the prepared GPU check, still runs: its --cpu-smoke mode on this machine's CPU."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_gpu_check_cpu_smoke_writes_one_table(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--cpu-smoke"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400, check=False)
    took = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "gpu.md").read_text().splitlines()
    assert table[0].startswith("| bench | measurement (cpu")
    assert table[1] == "|---|---|---|---|---|"
    body = table[2:]
    assert all(line.startswith("| ") and line.count(" | ") == 4 for line in body), table
    assert not [line for line in body if "step failed" in line], proc.stderr[-3000:]
    benches = {line.split(" | ")[0].strip("| ") for line in body}
    assert {"preprocess", "inference", "pipeline", "runtimes"} <= benches
    assert any("retinaface-r50+fan" in line and "detect" in line for line in body)
    assert any("worker path" in line for line in body)
    assert any(line.startswith("| runtimes |") and ", onnx (cpu)" in line and "pass" in line for line in body)
    photos_per_s = [line for line in body if "sustained photos/s" in line]
    assert photos_per_s and float(photos_per_s[0].split(" | ")[2]) > 0
    print(f"bench/gpu.sh --cpu-smoke took {took:.0f} s")

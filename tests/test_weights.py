"""Weights load only from disk, with their hashes checked; a missing file is one clear line."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from shared.ml.formats import weights
from tests.conftest import shared_data

MOBILENET = next(w for w in weights.WEIGHTS if w.filename == "retinaface_mobilenet0.25.pth")


def test_present_file_is_found_and_verified(tmp_path, monkeypatch):
    src = shared_data("weights", "retinaface_mobilenet0.25.pth")
    shutil.copy(src, tmp_path / MOBILENET.filename)
    monkeypatch.setenv("GESTALT_WEIGHTS_DIR", str(tmp_path))
    assert weights.require(MOBILENET) == tmp_path / MOBILENET.filename
    states = {row["file"]: row["state"] for row in weights.status()}
    assert states[MOBILENET.filename] == "present"


def test_wrong_or_missing_file_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("GESTALT_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(weights.WeightsMissing, match="gestalt weights fetch"):
        weights.require(MOBILENET)
    (tmp_path / MOBILENET.filename).write_bytes(b"a different model with the same name")
    with pytest.raises(weights.WeightsMissing, match="sha256"):
        weights.require(MOBILENET)
    assert {row["file"]: row["state"] for row in weights.status()}[MOBILENET.filename] == "wrong sha256"


def test_cli_status_and_offline_fetch(tmp_path):
    env = {"GESTALT_WEIGHTS_DIR": str(tmp_path), "TORCH_HOME": str(tmp_path / "t"), "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "shared.cli", "weights", "status"], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0 and "missing" in r.stdout and "2DFAN4" in r.stdout
    # No network here: the fetch fails with one line, not a traceback, and leaves no partial file.
    r = subprocess.run([sys.executable, "-m", "shared.cli", "weights", "fetch", "--only", MOBILENET.filename],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "could not fetch weights" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("*.part"))

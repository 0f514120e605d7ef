"""`gestalt train` as a person runs it: presets, the flat-layout warning, the run-time estimate (of the CASIA-Nets'
training loop, `--backbone casia`)."""
from __future__ import annotations

import subprocess
import sys

import torch

from tests.conftest import shared_data


def test_flat_layout_warns_and_records_unknown_subjects(tmp_path):
    orl = shared_data("faces", "orl")
    data = tmp_path / "flat"
    for s in ("s1", "s2", "s3", "s4"):
        (data / s).mkdir(parents=True)
        for i in range(1, 6):
            (data / s / f"{i}.pgm").symlink_to(orl / s / f"{i}.pgm")
    out = tmp_path / "model.pt"
    r = subprocess.run([sys.executable, "-m", "shared.cli", "train", "--data", str(data), "--preset", "cpu-small",
                        "--backbone", "casia",
                        "--epochs", "1", "--width", "0.125", "--no-register", "--output", str(out),
                        "--cache", str(tmp_path / "cache"), "--val-fraction", "0.25"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    text = " ".join((r.stdout + r.stderr).split())
    assert "WARNING: subjects are unknown." in text and "every photo counts as its own subject" in text
    assert "preset cpu-small: width 0.125, 1 epochs, batch size 16" in text  # explicit options win
    assert "for 1 epoch (estimated from the first batches)" in text
    metrics = torch.load(out, map_location="cpu", weights_only=False)["metrics"]
    assert metrics["subjects_known"] is False and metrics["config"]["batch_size"] == 16
    assert metrics["timing"]["estimated_seconds"] > 0

"""`gestalt evaluate` and `gestalt stats` as a person runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from shared.ml.data import scan_folder
from shared.ml.gestalt import save_checkpoint
from shared.ml.preprocess import Preprocessor
from shared.ml.splits import subject_split
from shared.ml.training import TrainConfig, prepare, train_ensemble
from tests.conftest import shared_data


def gestalt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True, timeout=600)


def _train(folder, names, tmp_path, epochs=3):
    samples = [s for s in scan_folder(folder) if s.label in names and s.path.name != "10.pgm"]
    classes = sorted({s.label for s in samples})
    pre = Preprocessor()
    data = prepare(samples, classes, pre, progress=False)
    train_idx, val_idx = subject_split(data.samples, 0.1)
    model, metrics = train_ensemble(data, classes, pre.regions, train_idx, val_idx,
                                    TrainConfig(width=0.125, epochs=epochs, lr=0.002, progress=False))
    path = tmp_path / "model.pt"
    seen = [data.samples[i] for i in train_idx]
    path.write_bytes(save_checkpoint(model, classes, metrics, {
        "train_subjects": sorted({s.subject for s in seen}), "train_sha256": sorted({s.sha256 for s in seen})}))
    return path


def _held_out(orl, names, tmp_path):
    test = tmp_path / "test"
    for name in names:
        (test / name).mkdir(parents=True)
        (test / name / "10.pgm").symlink_to(orl / name / "10.pgm")
    return test


def test_evaluate_writes_a_complete_report(tmp_path):
    orl = shared_data("faces", "orl")
    names = [f"s{i}" for i in range(1, 13)]
    model = _train(orl, names, tmp_path)
    out = tmp_path / "report"
    r = gestalt("evaluate", "--model", str(model), "--data", str(_held_out(orl, names, tmp_path)), "--out", str(out),
                "--resamples", "500", "--permutations", "2000", "--baseline-accuracy", "0.3")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_image"]) == {"top1", "top5", "top10"} == set(metrics["macro"])
    assert set(metrics["regions"]) == {"full_face", "upper_half", "middle_face", "lower_half", "aggregate"}
    assert 0 < metrics["permutation_p"]["top1"] <= 1 and "baseline" in metrics
    assert len(metrics["topk_curve"]) == 12 and metrics["topk_curve"][-1] == 1.0
    assert "disjoint" in metrics["data"]["split"]
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for section in ("Top-k accuracy", "Against the baseline", "Regions against the aggregate", "Plots"):
        assert section in md and section in html
    for png in ("confusion_matrix.png", "topk_curve.png", "composite_faces.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 200
        assert png in md and png in html


def test_evaluate_refuses_leaked_subjects(tmp_path):
    orl = shared_data("faces", "orl")
    names = ["s1", "s2"]
    model = _train(orl, names, tmp_path, epochs=1)
    leaked = tmp_path / "leaked"
    for name in names:
        (leaked / name).mkdir(parents=True)
        (leaked / name / "1.pgm").symlink_to(orl / name / "1.pgm")
    r = gestalt("evaluate", "--model", str(model), "--data", str(leaked), "--out", str(tmp_path / "r"))
    assert r.returncode != 0 and "leakage" in r.stderr


def test_evaluate_binary_model(tmp_path):
    orl = shared_data("faces", "orl")
    names = ["s1", "s3"]
    model = _train(orl, names, tmp_path, epochs=2)
    out = tmp_path / "report"
    r = gestalt("evaluate", "--model", str(model), "--data", str(_held_out(orl, names, tmp_path)), "--out", str(out),
                "--positive", "s3", "--resamples", "200", "--permutations", "200")
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["binary"]["positive"] == "s3"
    assert {"accuracy", "sensitivity", "specificity"} <= set(metrics["binary"])
    assert "Binary model" in (out / "report.md").read_text()


def test_too_few_usable_photos_is_a_clear_error(tmp_path):
    orl = shared_data("faces", "orl")
    model = _train(orl, ["s1", "s2"], tmp_path, epochs=1)
    # s2 sits far from the camera in most photos: its photo 10 fails the face-size gate, leaving one photo.
    r = gestalt("evaluate", "--model", str(model), "--data", str(_held_out(orl, ["s1", "s2"], tmp_path)),
                "--out", str(tmp_path / "r"))
    assert r.returncode != 0 and "at least 2 are needed" in r.stderr and "too small" in r.stderr
    assert "Traceback" not in r.stderr


def test_stats_commands(tmp_path):
    r = gestalt("stats", "proportion-test", "--k1", "31", "--n1", "32", "--p2", "0.75", "--n2", "32")
    assert r.returncode == 0 and r.stdout.strip() == "z=2.5170 p=0.01184"
    r = gestalt("stats", "bootstrap-ci", "--k", "31", "--n", "32")
    assert r.stdout.strip() == "accuracy=96.88% ci95=[90.62%, 100.00%]"
    r = gestalt("stats", "bootstrap-ci", "--k", "40", "--n", "32")
    assert r.returncode != 0 and "k <= n" in r.stderr

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    probs = np.eye(3)[labels] * 0.9 + 0.05
    csv = tmp_path / "pred.csv"
    rows = (f"{'abc'[y]},{p[0]},{p[1]},{p[2]}\n" for y, p in zip(labels, probs, strict=True))
    csv.write_text("label,a,b,c\n" + "".join(rows))
    r = gestalt("stats", "permutation", "--predictions", str(csv), "--k", "1", "--permutations", "999")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "top1=1.0000 p=0.001"
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    r = gestalt("stats", "permutation", "--predictions", str(bad))
    assert r.returncode != 0 and "label" in r.stderr


@pytest.mark.parametrize("args", [("stats", "proportion-test", "--k1", "1", "--n1", "0", "--p2", "0.5", "--n2", "3")])
def test_stats_errors_are_one_line(args):
    r = gestalt(*args)
    assert r.returncode != 0 and "Traceback" not in r.stderr

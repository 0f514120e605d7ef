"""`gestalt evaluate` and `gestalt stats` as a person runs them."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from shared.ml.members.casia import casia_only
from shared.ml.preprocess.pipeline import Preprocessor
from shared.ml.train.checkpoint import save_checkpoint
from shared.ml.train.data import scan_folder
from shared.ml.train.loop import train_ensemble
from shared.ml.train.prepared import prepare
from shared.ml.train.recipe import TrainConfig
from shared.ml.train.splits import subject_split
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
    path.write_bytes(save_checkpoint(casia_only(model, classes), metrics, {
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
    pose = metrics["by_pose"]  # each photo is frontal or flagged turned, from its own landmarks
    assert pose["frontal"]["images"] + pose["turned"]["images"] == metrics["data"]["images"]
    assert "flagged 'turned face: less reliable'" in r.stdout
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()
    for section in ("Top-k accuracy", "Against the baseline", "Regions against the aggregate", "Plots",
                    "Frontal and turned faces"):
        assert section in md and section in html
    assert (out / "predictions.csv").read_text().count("\n") == 1 + metrics["data"]["images"]
    for png in ("confusion_matrix.png", "topk_curve.png", "composite_faces.png", "reliability.png"):
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
    assert {"accuracy", "sensitivity", "specificity", "ppv", "npv", "auc"} <= set(metrics["binary"])
    assert "Screening model: s3 against s1" in (out / "report.md").read_text()


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


def _manifest(path, rows, bom=False, crlf=False):
    nl = "\r\n" if crlf else "\n"
    text = nl.join(["image,subject,label", *(",".join(r) for r in rows)]) + nl
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return path


def test_binary_model_evaluated_on_the_original_labels(tmp_path):
    """Issue #17: `train --mode binary --positive down` merged `healthy` into `others`; evaluation refused it."""
    orl = shared_data("faces", "orl")
    # s1, s3, s4 and s5 have faces large enough in photos 1, 3, 6 and 7.
    train = _manifest(tmp_path / "train.csv", [(str(orl / f"s{s}" / f"{i}.pgm"), f"s{s}", lab)
                                               for s, lab in ((1, "down"), (3, "healthy"), (4, "down"),
                                                              (5, "healthy")) for i in (1, 3, 6, 7)],
                      bom=True, crlf=True)
    model = tmp_path / "m.pt"
    r = gestalt("train", "--data", str(train), "--mode", "binary", "--positive", "down", "--no-register",
                "--output", str(model), "--width", "0.125", "--epochs", "1", "--val-fraction", "0.5",
                "--threads", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "top5" not in r.stderr and "operating threshold" in r.stderr
    assert not (tmp_path / "m.pt.state").exists()  # the epoch state of a finished run is removed
    test_rows = [(str(orl / f"s{s}" / f"{i}.pgm"), f"s{s}", lab)
                 for s, lab in ((6, "down"), (7, "healthy"), (8, "healthy")) for i in (9, 10)]
    test = _manifest(tmp_path / "test.csv", test_rows, crlf=True)
    down_only = _manifest(tmp_path / "down.csv", [row for row in test_rows if row[2] == "down"])
    out = tmp_path / "report"
    r = gestalt("evaluate", "--model", str(model), "--data", str(test), "--data", f"down-only={down_only}",
                "--positive", "down", "--out", str(out), "--resamples", "200", "--permutations", "100",
                "--prevalence", "0.01", "--threads", "1")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unknown label" not in r.stderr
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    b = metrics["binary"]
    assert metrics["label_map"] == {"healthy": "others"}
    assert "validation" in b["threshold_source"] or "default" in b["threshold_source"]
    assert b["n_positive"] + b["n_negative"] == metrics["data"]["images"]
    assert metrics["preprocessing"]["detector"] and metrics["temperature"] is not None
    rows = (out / "test" / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("image,subject,original_label,label,predicted,correct,ranking,score:down,score:others")
    assert any(",healthy,others," in row for row in rows[1:])
    single = json.loads((out / "down-only" / "metrics.json").read_text())["binary"]
    assert single["specificity"]["n"] == 0 and single["accuracy"]["n"] > 0
    assert "nan" not in (out / "down-only" / "report.md").read_text().lower()
    summary = json.loads((out / "metrics.json").read_text())
    assert [s["set"] for s in summary["sets"]] == ["test", "down-only"]
    assert "| test set | images | skipped | correct calls | sensitivity | specificity | AUC | ECE |" in (
        out / "report.md").read_text()
    r = gestalt("stats", "mcnemar", str(out / "test" / "predictions.csv"), str(out / "test" / "predictions.csv"))
    assert r.returncode == 0 and "only_A=0 only_B=0" in r.stdout and "p=1" in r.stdout, r.stderr


def test_skipped_photos_are_summarised(tmp_path):
    orl = shared_data("faces", "orl")
    model = _train(orl, ["s1", "s2"], tmp_path, epochs=1)
    # Most of s2's photos fail the face-size gate.
    test = _manifest(tmp_path / "t.csv", [(str(orl / s / f"{i}.pgm"), s, s) for s in ("s1", "s2") for i in (8, 9, 10)])
    r = gestalt("evaluate", "--model", str(model), "--data", str(test), "--out", str(tmp_path / "r"),
                "--resamples", "100", "--permutations", "100", "--allow-leakage")
    skipped = (tmp_path / "r" / "skipped.csv").read_text().splitlines()
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(skipped) > 1 and f"skipped {len(skipped) - 1} photo(s)" in r.stderr
    assert "the face is too small in the photo" in r.stderr and str(orl / "s2") not in r.stderr


def test_second_evaluate_reads_the_preprocessing_cache(tmp_path):
    orl = shared_data("faces", "orl")
    names = ["s1", "s2", "s3", "s4"]
    model = _train(orl, names, tmp_path, epochs=1)
    test = _held_out(orl, names, tmp_path)
    cache = tmp_path / "prep-cache"
    args = ["evaluate", "--model", str(model), "--data", str(test), "--resamples", "100", "--permutations", "100",
            "--cache", str(cache)]
    first = gestalt(*args, "--out", str(tmp_path / "r1"))
    assert first.returncode == 0, first.stderr[-3000:]
    assert "0 photo(s) read, 4 computed" in first.stdout + first.stderr
    second = gestalt(*args, "--out", str(tmp_path / "r2"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "4 photo(s) read, 0 computed" in second.stdout + second.stderr
    assert (tmp_path / "r1" / "predictions.csv").read_text() == (tmp_path / "r2" / "predictions.csv").read_text()
    none = gestalt("evaluate", "--model", str(model), "--data", str(test), "--resamples", "100", "--permutations",
                   "100", "--no-cache", "--cache", str(tmp_path / "unused"), "--out", str(tmp_path / "r3"))
    assert none.returncode == 0, none.stderr[-3000:]
    assert not (tmp_path / "unused").exists() and "photo(s) read" not in none.stdout + none.stderr

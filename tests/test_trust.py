"""Issue #17, evaluation that says whether to trust a model: the statistics, the report and the inputs that hit."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.metrics import roc_auc_score

from shared.ml.evaluate import statistics as ev


# ---------------------------------------------------------------------------- 7: rejection messages
def _degrees(message: str) -> float:
    return float(re.search(r"([\d.]+) degrees", message).group(1))


@pytest.mark.parametrize("yaw", [60.3, 60.01, -60.4, 75.0])
def test_yaw_rejection_never_shows_the_limit(yaw):
    from shared.ml.preprocess.quality import MAX_TURN_DEGREES, rejection

    message = rejection({"interocular_px": 30, "yaw_degrees": yaw, "brightness": 100, "sharpness": 50})
    assert "about 60 degrees" not in message  # what a researcher once saw: "about 45 degrees, at most 45 accepted"
    assert _degrees(message) > MAX_TURN_DEGREES


@pytest.mark.parametrize("px", [15.7, 15.99, 3.0])
def test_face_size_rejection_never_shows_the_limit(px):
    from shared.ml.preprocess.quality import MIN_INTEROCULAR_PX, rejection

    message = rejection({"interocular_px": px, "yaw_degrees": 0, "brightness": 100, "sharpness": 50})
    assert float(re.search(r"eyes ([\d.]+) pixels", message).group(1)) < MIN_INTEROCULAR_PX


# ---------------------------------------------------------------------------- 8: bootstrap CI of k/n
@pytest.mark.parametrize("seed", [0, 1, 2, 7])
def test_bootstrap_ci_16_of_25_is_exact_whatever_the_seed(seed):
    ci = ev.bootstrap_ci_counts(16, 25, resamples=10_000, seed=seed)
    assert (ci.value, ci.low, ci.high) == (0.64, 0.44, 0.84)  # the paper's 44-84


def test_exact_bootstrap_matches_monte_carlo():
    rng = np.random.default_rng(3)
    for k, n in ((16, 25), (3, 40), (90, 100)):
        means = rng.binomial(n, k / n, 200_000) / n
        ci = ev.exact_bootstrap_counts(k, n)
        assert ci.low == pytest.approx(np.percentile(means, 2.5, method="inverted_cdf"), abs=1 / n + 1e-9)
        assert ci.high == pytest.approx(np.percentile(means, 97.5, method="inverted_cdf"), abs=1 / n + 1e-9)


def test_stats_bootstrap_ci_cli_is_seed_free():
    from shared.cli import main

    outs = {CliRunner().invoke(main, ["stats", "bootstrap-ci", "--k", "16", "--n", "25", "--seed", str(s)]).output
            for s in range(3)}
    assert outs == {"accuracy=64.00% ci95=[44.00%, 84.00%]\n"}


# ---------------------------------------------------------------------------- 6: screening statistics
def test_zero_of_three_has_a_real_interval():
    ci = ev.proportion(0, 3)
    assert ci.value == 0 and ci.low == 0 and ci.high == pytest.approx(0.7076, abs=1e-3)  # Clopper-Pearson
    assert ev.proportion(0, 0).percent() == "n/a"


def test_screening_metrics_against_hand_counts():
    truth = np.array([1] * 10 + [0] * 30, bool)
    prob = np.r_[np.linspace(0.95, 0.3, 10), np.linspace(0.7, 0.0, 30)]
    m = ev.screening_metrics(prob, truth, threshold=0.5, prevalence=0.01, resamples=2000)
    tp, fn = int((prob[truth] >= 0.5).sum()), int((prob[truth] < 0.5).sum())
    tn, fp = int((prob[~truth] < 0.5).sum()), int((prob[~truth] >= 0.5).sum())
    assert m["counts"] == {"tp": tp, "fn": fn, "tn": tn, "fp": fp}
    assert m["sensitivity"].value == tp / 10 and m["specificity"].value == tn / 30
    assert m["ppv"].value == tp / (tp + fp) and m["npv"].value == tn / (tn + fn)
    se, sp = tp / 10, tn / 30
    assert m["at_prevalence"]["ppv"].value == pytest.approx(se * 0.01 / (se * 0.01 + (1 - sp) * 0.99))
    a = m["at_prevalence"]["ppv"]
    assert a.low <= a.value <= a.high
    assert m["auc"].value == pytest.approx(roc_auc_score(truth, prob))
    assert m["auc"].low < m["auc"].value < m["auc"].high


def test_auc_bootstrap_matches_sklearn_per_resample():
    rng = np.random.default_rng(0)
    truth = rng.random(50) < 0.4
    score = np.round(truth * 0.3 + rng.random(50), 1)  # ties, as scikit-learn averages them
    ours = ev.auc_with_ci(truth, score, resamples=2000, seed=5)
    aucs = []
    for _ in range(1000):
        idx = rng.integers(0, 50, 50)
        if 0 < truth[idx].sum() < 50:
            aucs.append(roc_auc_score(truth[idx], score[idx]))
    assert ours.low == pytest.approx(np.percentile(aucs, 2.5), abs=0.04)
    assert ours.high == pytest.approx(np.percentile(aucs, 97.5), abs=0.04)


def test_single_class_test_set_has_no_nan():
    truth = np.ones(3, bool)
    m = ev.screening_metrics(np.array([0.2, 0.3, 0.4]), truth, 0.5, resamples=100)
    assert m["accuracy"].percent() == "0.0% (0.0–70.8)"  # 0 of 3 correct calls, not 0.0-0.0
    assert m["specificity"].percent() == "n/a" and m["auc"].percent() == "n/a"


def test_calibration_error_by_hand():
    prob = np.array([0.05, 0.15, 0.15, 0.95, 0.95, 0.95, 0.95])
    outcome = np.array([0, 1, 0, 1, 1, 1, 0])
    cal = ev.calibration(prob, outcome)
    expected = (1 / 7) * 0.05 + (2 / 7) * abs(0.15 - 0.5) + (4 / 7) * abs(0.95 - 0.75)
    assert cal["ece"] == pytest.approx(expected)
    assert [b["n"] for b in cal["bins"]] == [1, 2, 4]


def test_threshold_is_chosen_by_youden():
    truth = np.array([0, 0, 0, 1, 1, 1], bool)
    prob = np.array([0.1, 0.2, 0.3, 0.35, 0.6, 0.9])
    t = ev.choose_threshold(prob, truth)
    assert 0.3 < t <= 0.35
    assert ev.choose_threshold(prob, np.ones(6, bool)) is None


def test_mcnemar_matches_statsmodels():
    from statsmodels.stats.contingency_tables import mcnemar

    a = np.array([1] * 30 + [1] * 12 + [0] * 3 + [0] * 5, bool)
    b = np.array([1] * 30 + [0] * 12 + [1] * 3 + [0] * 5, bool)
    r = ev.mcnemar_test(a, b)
    assert (r.both_right, r.only_a, r.only_b, r.both_wrong) == (30, 12, 3, 5)
    assert r.p == pytest.approx(mcnemar([[30, 12], [3, 5]], exact=True).pvalue)


def test_temperature_fit_recovers_overconfidence():
    rng = np.random.default_rng(1)
    n, c = 4000, 5
    logits = rng.normal(0, 1.0, (n, c))
    true_p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = np.array([rng.choice(c, p=p) for p in true_p])
    overconfident = ev.apply_temperature(true_p, 1 / 3)  # three times too sharp
    region_probs = np.stack([overconfident, overconfident], axis=1)
    t = ev.fit_temperature(region_probs, labels)
    assert t == pytest.approx(3.0, rel=0.15)
    np.testing.assert_array_equal(ev.apply_temperature(true_p, 2).argmax(1), true_p.argmax(1))


# ---------------------------------------------------------------------------- 1: label mapping
def test_binary_label_mapping_is_applied_to_test_labels():
    from shared.ml.train.data import Sample
    from shared.ml.train.modes import apply_label_map, binary_label_map

    test = [Sample(Path(f"{lab}.jpg"), lab, lab) for lab in ("down", "healthy", "noonan")]
    extra = {"mode": "binary", "label_map": binary_label_map({"down", "healthy"}, "down"), "positive": "down",
             "negative": "others"}
    mapped, applied = apply_label_map(test, ["down", "others"], extra)
    assert [s.label for s in mapped] == ["down", "others", "others"]
    assert applied == {"healthy": "others", "noonan": "others"}
    # An older binary checkpoint without a map: non-positive labels still go to the negative class.
    mapped, _ = apply_label_map(test, ["down", "others"], {})
    assert [s.label for s in mapped] == ["down", "others", "others"]
    # A multiclass model keeps labels as they are (prepare then lists the unknown ones).
    mapped, applied = apply_label_map(test, ["down", "healthy"], {"mode": "multiclass"})
    assert [s.label for s in mapped] == ["down", "healthy", "noonan"] and applied == {}


# ---------------------------------------------------------------------------- 2: manifests
def test_header_only_manifest_is_a_clear_error(tmp_path):
    from shared.ml.train.data import load_manifest

    m = tmp_path / "test.csv"
    m.write_bytes(b"\xef\xbb\xbfimage,subject,label\r\n")
    with pytest.raises(ValueError, match="lists no images"):
        load_manifest(m)


def test_manifest_with_bom_and_crlf(tmp_path):
    from shared.ml.train.data import load_manifest

    (tmp_path / "a.jpg").write_bytes(b"x")
    m = tmp_path / "m.csv"
    m.write_bytes("\ufeffimage,subject,label\r\na.jpg,P1,down\r\n\r\n".encode())
    [s] = load_manifest(m)
    assert (s.path, s.subject, s.label) == (tmp_path / "a.jpg", "P1", "down")


def _tiny_checkpoint(path: Path, classes=("down", "others"), extra=None) -> Path:
    import torch

    from shared.ml.members.casia import casia_only
    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    net = RegionalEnsemble(("full_face",), len(classes), width=0.125)
    path.write_bytes(save_checkpoint(casia_only(net, list(classes)), {}, extra or {}))
    return path


@pytest.mark.parametrize("command", ["evaluate", "train", "pretrain"])
def test_header_only_manifest_on_the_command_line(tmp_path, command):
    from shared.cli import main

    m = tmp_path / "test.csv"
    m.write_bytes(b"\xef\xbb\xbfimage,subject,label\r\n")
    args = {"evaluate": ["evaluate", "--model", str(_tiny_checkpoint(tmp_path / "m.pt")), "--data", str(m),
                         "--out", str(tmp_path / "r")],
            "train": ["train", "--data", str(m), "--no-register"],
            "pretrain": ["pretrain", "--data", str(m), "--output", str(tmp_path / "p.pt")]}[command]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and not isinstance(r.exception, ValueError), r.output
    assert "lists no images" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------------------- 3: threads and device
@pytest.mark.parametrize("command", ["train", "evaluate", "pretrain"])
def test_threads_and_device_are_documented(command):
    from shared.cli import main

    out = CliRunner().invoke(main, [command, "--help"]).output
    assert "--threads" in out and "GESTALT_TORCH_THREADS" in out
    assert "--device" in out and "GESTALT_DEVICE" in out


def test_an_absent_cuda_device_is_a_clear_error(tmp_path):
    import torch

    from shared.cli import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = CliRunner().invoke(main, ["evaluate", "--model", str(_tiny_checkpoint(tmp_path / "m.pt")), "--data",
                                  str(tmp_path), "--device", "cuda", "--threads", "1"])
    assert r.exit_code == 1 and "no CUDA device" in r.output


# ---------------------------------------------------------------------------- 4: skipped photos
def test_skipped_photos_are_counted_by_reason(tmp_path):
    from shared.ml.preprocess.quality import rejection
    from shared.ml.train.data import Sample
    from shared.ml.train.prepared import skipped_summary, write_skipped

    small = [rejection({"interocular_px": px, "yaw_degrees": 0, "brightness": 99, "sharpness": 99})
             for px in (10.0, 12.5, 14.1)]
    rejected = [(Sample(Path(f"{i}.jpg"), "down", f"p{i}"), r) for i, r in enumerate(
        [*small, "no face was found in the photo; upload a frontal photo of the face"])]
    assert skipped_summary(rejected) == [("the face is too small in the photo", 3),
                                         ("no face was found in the photo", 1)]
    write_skipped(rejected, tmp_path / "skipped.csv")
    lines = (tmp_path / "skipped.csv").read_text().splitlines()
    assert lines[0] == "image,subject,label,reason" and len(lines) == 5


# ---------------------------------------------------------------------------- 6: the binary report
def _binary_input(labels, seed=0, **kw):
    from shared.ml.evaluate.inputs import EvalInput

    rng = np.random.default_rng(seed)
    n = len(labels)
    rp = rng.dirichlet([2, 2], (n, 2)).astype(np.float32)
    return EvalInput(model_name="m", class_names=["down", "others"], regions=["full_face", "lower_half"],
                     region_probs=rp, labels=np.asarray(labels), subjects=[f"p{i}" for i in range(n)],
                     data_source="test.csv", data_hash="h", split="disjoint", positive="down", resamples=300,
                     permutations=200, aligned=rng.integers(0, 255, (n, 200, 200)).astype(np.uint8),
                     images=[f"{i}.jpg" for i in range(n)], preprocessing={"detector": "mediapipe-blazeface",
                                                                           "landmarker": "mediapipe-facemesh"},
                     **kw)


def test_binary_report_has_screening_figures(tmp_path):
    from shared.ml.evaluate.report import write_report

    labels = np.array([0] * 12 + [1] * 18)
    m = write_report(_binary_input(labels, threshold=0.45, threshold_source="Youden's J on 10 validation images",
                                   prevalence=0.001), tmp_path)
    b = m["binary"]
    assert b["threshold"] == 0.45 and b["positive"] == "down"
    for key in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "auc"):
        assert b[key]["low"] <= b[key]["value"] <= b[key]["high"]
        assert set(m["regions"]["full_face"][key]) == {"value", "low", "high", "n"}  # regions: the same metrics
    assert b["at_prevalence"]["prevalence"] == 0.001 and "ece" in m["calibration"]
    assert m["topk_curve"] == [] and not (tmp_path / "topk_curve.png").exists()
    assert set(m["per_image"]) == {"top1"}
    md = (tmp_path / "report.md").read_text()
    for text in ("ROC AUC", "sensitivity", "PPV at a prevalence of 0.1%", "roc_curve.png", "reliability.png",
                 "mediapipe-blazeface", "0.450", "expected calibration error"):
        assert text in md
    assert "nan" not in md.lower() and "top5" not in md
    json.loads((tmp_path / "metrics.json").read_text())  # valid JSON: no NaN
    with Image.open(tmp_path / "composite_faces.png") as im:
        assert im.size[0] >= 600 and im.size[1] >= 250
        top = np.asarray(im.convert("L"))[:40]
    dark = np.nonzero((top < 128).any(axis=0))[0]  # the title's ink: inside the image, not cut at the edges
    assert len(dark) and dark.min() > 5 and dark.max() < im.size[0] - 5


def test_single_class_binary_report_shows_the_rate_of_correct_calls(tmp_path):
    from shared.ml.evaluate.report import write_report

    m = write_report(_binary_input(np.zeros(3, int)), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "nan" not in md.lower()
    assert "n/a (no negative images)" in md and "n/a (one class only)" in md
    assert m["binary"]["accuracy"]["n"] == 3 and m["binary"]["accuracy"]["high"] > m["binary"]["accuracy"]["low"]


def test_predictions_csv_feeds_the_stats_commands(tmp_path):
    from shared.cli import main
    from shared.ml.evaluate.report import write_report

    labels = np.array([0] * 10 + [1] * 10)
    write_report(_binary_input(labels, seed=1), tmp_path / "a")
    write_report(_binary_input(labels, seed=2), tmp_path / "b")
    header = (tmp_path / "a" / "predictions.csv").read_text().splitlines()[0].split(",")
    assert header[:7] == ["image", "subject", "original_label", "label", "predicted", "correct", "ranking"]
    assert "score:down" in header and "full_face:down" in header and "lower_half:others" in header
    r = CliRunner().invoke(main, ["stats", "permutation", "--predictions", str(tmp_path / "a" / "predictions.csv"),
                                  "--permutations", "99"])
    assert r.exit_code == 0 and r.output.startswith("top1="), r.output
    r = CliRunner().invoke(main, ["stats", "mcnemar", str(tmp_path / "a" / "predictions.csv"),
                                  str(tmp_path / "b" / "predictions.csv")])
    assert r.exit_code == 0 and "images=20" in r.output and "mcnemar exact" in r.output, r.output
    other = tmp_path / "other.csv"
    other.write_text("image,correct\nx.jpg,1\n")
    r = CliRunner().invoke(main, ["stats", "mcnemar", str(tmp_path / "a" / "predictions.csv"), str(other)])
    assert r.exit_code == 1 and "same images" in r.output


def test_validation_of_two_classes_prints_top1_only(capsys):
    from shared.cli.train_steps import print_members

    row = {"top1": 0.5, "top5": 1.0, "top10": 1.0}
    metrics = {"validation": {"n": 4, "subjects": 2, "aggregate": row, "regions": {"full_face": row, "identity": row}},
               "weights": {"full_face": 0.0, "identity": 1.0},
               "members": {"identity": {"top1": {"value": 0.5, "low": 0.1, "high": 0.9}}}}
    print_members(metrics, 2)
    printed = capsys.readouterr().err
    assert "top1" in printed and "top5" not in printed and "top10" not in printed
    assert "identity" in printed and "1.00" in printed and "0.100-0.900" in printed
    print_members(metrics, 7)
    printed = capsys.readouterr().err
    assert "top5" in printed and "top10" not in printed


def test_evaluate_applies_the_stored_temperature_unless_told_not_to(tmp_path):
    from shared.cli import main
    from tests.conftest import shared_data

    orl = shared_data("faces", "orl")
    model = _tiny_checkpoint(tmp_path / "m.pt", extra={"mode": "binary", "positive": "down", "negative": "others",
                                                       "temperature": 5.0, "threshold": 0.4,
                                                       "threshold_source": "Youden's J on 9 validation images"})
    rows = [f"{orl / s / '10.pgm'},{s},{lab}" for s, lab in (("s1", "down"), ("s3", "healthy"), ("s4", "healthy"))]
    (tmp_path / "t.csv").write_text("image,subject,label\n" + "\n".join(rows) + "\n")
    probs = {}
    for flag in ("--temperature", "--no-temperature"):
        out = tmp_path / flag
        r = CliRunner().invoke(main, ["evaluate", "--model", str(model), "--data", str(tmp_path / "t.csv"), "--out",
                                      str(out), "--resamples", "50", "--permutations", "50", flag, "--threads", "1"])
        assert r.exit_code == 0, r.output
        m = json.loads((out / "metrics.json").read_text())
        assert m["binary"]["threshold"] == 0.4 and m["label_map"] == {"healthy": "others"}
        probs[flag] = (m["temperature"], (out / "predictions.csv").read_text().splitlines()[1].split(",")[7])
    assert probs["--temperature"][0] == 5.0 and probs["--no-temperature"][0] is None
    assert probs["--temperature"][1] != probs["--no-temperature"][1]


def test_error_gallery_shows_the_worst_false_positives_and_negatives(tmp_path):
    from shared.ml.evaluate.report import error_cases, write_report

    labels = np.array([0] * 10 + [1] * 10)
    inp = _binary_input(labels, threshold=0.5)
    p = inp.region_probs.mean(axis=1)[:, 0]
    fp = sorted((i for i in range(20) if labels[i] == 1 and p[i] >= 0.5), key=lambda i: -p[i])
    fn = sorted((i for i in range(20) if labels[i] == 0 and p[i] < 0.5), key=lambda i: p[i])
    cases = error_cases(inp)
    assert 0 < len(cases) <= 6
    assert [c["index"] for c in cases if c["kind"] == "false positive"] == fp[:len(
        [c for c in cases if c["kind"] == "false positive"])]
    assert [c["index"] for c in cases if c["kind"] == "false negative"] == fn[:len(
        [c for c in cases if c["kind"] == "false negative"])]
    seen = []
    inp.heatmap = lambda i, cls: seen.append((i, cls)) or np.zeros((200, 200, 3), np.uint8)
    m = write_report(inp, tmp_path)
    assert len(m["error_gallery"]) == len(cases) and all(cls == 0 for _, cls in seen)
    html = (tmp_path / "report.html").read_text()
    assert "Error gallery" in html and "false " in html
    for e in m["error_gallery"]:
        with Image.open(tmp_path / e["png"]) as im:
            assert im.size == (200, 200)
        assert e["png"] in html and e["png"] in (tmp_path / "report.md").read_text()


def test_error_gallery_multiclass_uses_the_most_confident_wrong_calls():
    from shared.ml.evaluate.inputs import EvalInput
    from shared.ml.evaluate.report import error_cases

    rp = np.full((4, 1, 3), 0.1, np.float32)
    rp[0, 0] = [0.1, 0.8, 0.1]   # wrong, confident
    rp[1, 0] = [0.3, 0.4, 0.3]   # wrong, unsure
    rp[2, 0] = [0.9, 0.05, 0.05]  # right
    rp[3, 0] = [0.05, 0.05, 0.9]  # wrong, most confident
    inp = EvalInput(model_name="m", class_names=["a", "b", "c"], regions=["full_face"], region_probs=rp,
                    labels=np.array([0, 0, 0, 1]), subjects=list("pqrs"), data_source="x", data_hash="h", split="s")
    assert [(c["index"], c["called"], c["heatmap_class"]) for c in error_cases(inp)] == [
        (3, "c", "c"), (0, "b", "b"), (1, "b", "b")]


def test_grad_cam_thumbnail_of_a_small_model():
    from types import SimpleNamespace

    import torch

    from shared.cli.evaluate import _heatmap_for
    from shared.ml.members.casia import casia_only
    from shared.ml.nets.ensemble import RegionalEnsemble

    torch.manual_seed(0)
    model = casia_only(RegionalEnsemble(("full_face", "upper_half"), 3, width=0.125).eval(), ["a", "b", "c"])
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (2, 2, 100, 100)).astype(np.uint8)
    data = SimpleNamespace(aligned=rng.integers(0, 255, (2, 200, 200)).astype(np.uint8), landmarks=None,
                           stored_crops=lambda i: {"full_face": crops[i, 0], "upper_half": crops[i, 1]})
    image = _heatmap_for(model, data, None)(1, 2)
    assert image.shape == (200, 200, 3) and image.dtype == np.uint8

"""Evaluation statistics: the paper's own figures, and agreement with scipy and statsmodels."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from statsmodels.stats.proportion import proportions_ztest

from shared.ml.evaluate import statistics as ev


def test_cdls_against_experts():
    # Table 1: DeepGestalt 31/32 vs. the experts' 75%: p = 0.01, CI about 90.6-100%.
    z = ev.two_proportion_ztest(31, 32, 0.75, 32)
    assert round(z.p, 2) == 0.01
    ci = ev.bootstrap_ci_counts(31, 32)
    assert ci.low == pytest.approx(29 / 32) and ci.high == 1.0
    # Basel-Vanagaite et al.'s 87% against the same baseline: p = 0.22 (a fractional count).
    assert ev.two_proportion_ztest(0.87 * 32, 32, 0.75, 32).p == pytest.approx(0.22, abs=0.02)


def test_angelman_against_experts():
    # Table 1: 23/25 vs. 71%: p = 0.05, CI 80-100%.
    assert ev.two_proportion_ztest(23, 25, 0.71, 25).p == pytest.approx(0.05, abs=0.01)
    ci = ev.bootstrap_ci_counts(23, 25)
    assert (ci.low, ci.high) == (pytest.approx(0.80), 1.0)


def test_multiclass_cis_from_the_paper():
    # Top-10 455/502: 90.6% (88-93); top-1 308/502: 61.3% (57.2-65.5).
    top10 = ev.bootstrap_ci_counts(455, 502)
    assert (round(100 * top10.low), round(100 * top10.high)) == (88, 93)
    top1 = ev.bootstrap_ci_counts(308, 502)
    assert round(100 * top1.low, 1) == pytest.approx(57.2, abs=0.3)
    assert round(100 * top1.high, 1) == pytest.approx(65.5, abs=0.3)


@pytest.mark.parametrize("seed", range(5))
def test_ztest_matches_closed_form_and_statsmodels(seed):
    rng = np.random.default_rng(seed)
    n1, n2 = rng.integers(10, 500, 2)
    k1, p2 = int(rng.integers(0, n1 + 1)), float(rng.uniform(0.05, 0.95))
    ours = ev.two_proportion_ztest(k1, int(n1), p2, int(n2))
    pooled = (k1 + p2 * n2) / (n1 + n2)
    z = (k1 / n1 - p2) / np.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    assert ours.z == pytest.approx(z)
    assert ours.p == pytest.approx(2 * stats.norm.sf(abs(z)))
    assert ours.p == pytest.approx(proportions_ztest([k1, p2 * n2], [n1, n2])[1])


@pytest.mark.parametrize("seed", range(3))
def test_bootstrap_matches_a_direct_percentile_bootstrap(seed):
    rng = np.random.default_rng(seed)
    hits = rng.random(300) < rng.uniform(0.2, 0.9)
    ours = ev.bootstrap_mean(hits, resamples=20_000, seed=seed)
    means = rng.choice(hits, (20_000, hits.size)).mean(axis=1)
    assert ours.low == pytest.approx(np.percentile(means, 2.5), abs=0.01)
    assert ours.high == pytest.approx(np.percentile(means, 97.5), abs=0.01)


def test_macro_top1_is_balanced_accuracy():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 6, 400)
    probs = rng.random((400, 6)) + 0.8 * np.eye(6)[labels] * rng.random((400, 1))
    hits = ev.topk_hits(probs, labels, 1)
    recalls = [hits[labels == c].mean() for c in range(6)]
    assert ev.bootstrap_macro(hits, labels, resamples=200).value == pytest.approx(np.mean(recalls))


def test_topk_hits_against_argsort():
    rng = np.random.default_rng(5)
    probs, labels = rng.random((200, 30)), rng.integers(0, 30, 200)
    for k in (1, 5, 10):
        top = np.argsort(-probs, axis=1)[:, :k]
        expected = np.array([labels[i] in top[i] for i in range(200)])
        np.testing.assert_array_equal(ev.topk_hits(probs, labels, k), expected)
    assert np.all(ev.true_ranks(probs, labels) >= 1)


def test_permutation_p_is_uniformish_for_chance_and_floored_for_perfect():
    ps = []
    for seed in range(30):
        rng = np.random.default_rng(100 + seed)
        labels = rng.integers(0, 10, 200)
        ps.append(ev.permutation_pvalue(rng.random((200, 10)), labels, k=1, resamples=999, seed=seed))
    assert stats.kstest(ps, "uniform").pvalue > 0.01
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    perfect = np.eye(10)[labels] + 0.01 * rng.random((200, 10))
    assert ev.permutation_pvalue(perfect, labels, k=1, resamples=999) == pytest.approx(1 / 1000)


def test_binary_metrics():
    truth = np.array([1] * 23 + [0] * 9, bool)
    pred = truth.copy()
    pred[0] = False  # one missed positive
    m = ev.binary_metrics(pred, truth, resamples=2000)
    assert m["accuracy"].value == pytest.approx(31 / 32)
    assert m["sensitivity"].value == pytest.approx(22 / 23)
    assert (m["specificity"].value, m["specificity"].low, m["specificity"].high) == (1.0, 1.0, 1.0)


def test_report_gives_accuracy_of_turned_faces_against_frontal_ones(tmp_path):
    """Photos flagged "turned face: less reliable" are scored; the report shows what that costs, with intervals."""
    from shared.ml.evaluate.inputs import EvalInput
    from shared.ml.evaluate.report import write_report
    from shared.ml.evaluate.text import headline

    labels = np.arange(40) % 4
    rp = np.full((40, 1, 4), 0.1, np.float32)
    rp[np.arange(40), 0, labels] = 0.7  # every photo right...
    turned = np.arange(40) >= 30
    rp[turned, 0] = 0.1
    rp[turned, 0, (labels[turned] + 1) % 4] = 0.7  # ...but the ten turned ones, all wrong at top-1
    inp = EvalInput(model_name="m", class_names=list("abcd"), regions=["full_face"], region_probs=rp, labels=labels,
                    subjects=[f"p{i}" for i in range(40)], data_source="x", data_hash="h", split="s", resamples=200,
                    permutations=200, turned=turned)
    metrics = write_report(inp, tmp_path)
    frontal, flagged = metrics["by_pose"]["frontal"], metrics["by_pose"]["turned"]
    assert (frontal["images"], flagged["images"]) == (30, 10)
    assert frontal["top1"]["value"] == 1.0 and flagged["top1"]["value"] == 0.0
    assert frontal["top1"]["low"] > 0.8 and flagged["top1"]["high"] > 0.25  # exact intervals, wide for ten photos
    line = [x for x in headline(metrics) if "turned face" in x]
    assert line and "100.0%" in line[0] and "0.0%" in line[0]
    for name in ("report.md", "report.html"):
        assert "Frontal and turned faces" in (tmp_path / name).read_text()
    # Unknown flags (older callers): no section, no figures.
    inp.turned = None
    assert write_report(inp, tmp_path / "none")["by_pose"] is None

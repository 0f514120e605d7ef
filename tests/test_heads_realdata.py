"""Heads on real syndrome features (GMDB embeddings): nights of new diagnoses under the promotion guard."""
from __future__ import annotations

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from shared.ml.train.heads import HeadConfig, heads_of, promotion_guard, train_heads, with_heads
from shared.ml.train.splits import in_holdout
from tests.conftest import shared_data

TOLERANCE = 0.02


def load_gmdb():
    path = shared_data("embeddings", "mini_gm_public_v0.1.p")
    with path.open("rb") as fh:
        raw = pickle.load(fh)  # noqa: S301 - the project's own shared test data
    feats, labels, subjects = [], [], []
    classes = sorted(raw)
    for ci, disorder in enumerate(classes):
        for subject, images in raw[disorder].items():
            for vector in images.values():
                feats.append(vector)
                labels.append(ci)
                subjects.append(f"{disorder}/{subject}")
    return np.asarray(feats, np.float32)[:, None, :], np.asarray(labels), np.asarray(subjects), classes


def test_nights_of_new_diagnoses_never_degrade():
    x, y, subjects, classes = load_gmdb()
    holdout = np.array([in_holdout(s, 0.2) for s in subjects])
    # Sorted first: a set's order follows Python's per-process string hashing, and the seeded permutation
    # must start from the same list in every process for the nights to be the same.
    pool = sorted(set(subjects[~holdout]))
    rng = np.random.default_rng(0)
    pool = list(rng.permutation(pool))
    batches = [pool[: int(0.3 * len(pool))]] + np.array_split(pool[int(0.3 * len(pool)):], 5)
    arrived: set[str] = set()
    active = None
    table = []
    for night, batch in enumerate(batches):
        arrived |= set(batch)
        train = np.isin(subjects, list(arrived)) & ~holdout
        heads = train_heads(x[train], y[train], len(classes), HeadConfig(seed=night))
        cand = heads.probs(x[holdout]).mean(axis=1)
        act = None if active is None else active.probs(x[holdout]).mean(axis=1)
        guard = promotion_guard(cand, act, y[holdout], y[holdout], classes, TOLERANCE)
        if guard.promote:
            active = heads
        top1 = (guard.candidate if guard.promote else guard.active)["per_image"]["top1"]["value"]
        table.append((night, int(train.sum()), guard.candidate["per_image"]["top1"]["value"], guard.promote, top1))
    print("\nnight  train images  candidate top-1  promoted  active top-1")
    for row in table:
        print(f"{row[0]:>5}  {row[1]:>12}  {row[2]:>15.3f}  {row[3]!s:>8}  {row[4]:>11.3f}")
    active_top1 = [row[4] for row in table]
    assert all(b >= a - TOLERANCE for a, b in zip(active_top1, active_top1[1:], strict=False))
    assert active_top1[-1] > active_top1[0], "more diagnosed patients must help"
    assert table[0][3], "the first night has nothing to compare with and is promoted"


def test_heads_benchmark_cli_beats_the_sklearn_baselines():
    """`gestalt heads-benchmark`: 5-fold subject-disjoint per-image top-1 of our heads above both scikit-learn
    baselines computed in the same run (README: LR 0.774, centroid 0.783), with gallery matching beside them."""
    path = shared_data("embeddings", "mini_gm_public_v0.1.p")
    r = subprocess.run([sys.executable, "-m", "shared.cli", "heads-benchmark", "--embeddings", str(path)],
                       capture_output=True, text=True, timeout=600, env={**os.environ, "COLUMNS": "200"}, check=False)
    assert r.returncode == 0, r.stderr[-3000:]
    print("\n" + r.stdout)
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"top1=0\.\d{4}", last), last
    rows = {m.group(1).strip(): [float(v) for v in m.groups()[1:]] for m in re.finditer(
        r"│\s*([a-z][^│]+?)\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│", r.stdout)}
    heads = rows["heads (ours: softmax per region)"]
    lr = rows["logistic regression (scikit-learn)"]
    centroid = rows["nearest class centroid, cosine (scikit-learn)"]
    gallery = rows["gallery (syndromes by nearest patient, cosine)"]
    assert float(last.split("=")[1]) == pytest.approx(heads[0], abs=1e-3)
    assert lr[0] == pytest.approx(0.774, abs=0.01) and centroid[0] == pytest.approx(0.783, abs=0.01)
    assert heads[0] > lr[0] and heads[0] > centroid[0]
    assert 0.5 < gallery[0] <= gallery[1] and gallery[1] > 0.9  # nearest patient; top-5 by nearest patients


def test_with_heads_round_trip():
    import torch

    from shared.ml.nets.ensemble import RegionalEnsemble
    from shared.ml.nets.ensemble import predict_regions as predict
    from shared.ml.train.heads import extract_features

    torch.manual_seed(0)
    model = RegionalEnsemble(("full_face", "lower_half"), 3, width=0.125).eval()
    crops = np.random.default_rng(0).integers(0, 255, (6, 2, 100, 100), dtype=np.uint8)
    feats = extract_features(model, crops)
    np.testing.assert_allclose(heads_of(model).probs(feats), predict(model, crops).region_probs, atol=1e-5)
    heads = train_heads(feats, np.array([0, 1, 2, 3, 0, 1]), 4, HeadConfig(epochs=5))
    bigger = with_heads(model, heads)
    np.testing.assert_allclose(predict(bigger, crops).region_probs, heads.probs(feats), atol=1e-4)


def test_guard_rejects_a_collapsed_class_and_a_drop():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(12), 5)
    good = np.eye(12)[labels] + 0.1 * rng.random((60, 12))
    collapsed = good.copy()
    collapsed[labels == 3, 3] = -1.0  # class 3 is never ranked any more
    names = [f"c{i}" for i in range(12)]
    verdict = promotion_guard(collapsed, good, labels, labels, names)
    assert not verdict.promote and "c3" in verdict.reason
    worse = rng.random((60, 12))
    verdict = promotion_guard(worse, good, labels, labels, names)
    assert not verdict.promote and "top1 fell" in verdict.reason
    assert promotion_guard(good, good, labels, labels, names).promote

"""Heads on real syndrome features (GMDB embeddings): nights of new diagnoses under the promotion guard."""
from __future__ import annotations

import pickle

import numpy as np

from shared.ml.heads import HeadConfig, heads_of, promotion_guard, train_heads, with_heads
from shared.ml.splits import in_holdout
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
    pool = sorted(set(subjects[~holdout]), key=lambda s: in_holdout(s, 1.0, salt="arrival") or s)
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


def test_heads_beat_the_sklearn_baselines_on_gmdb():
    """5-fold subject-disjoint per-image top-1 against the README's baselines (0.774 / 0.783)."""
    x, y, subjects, classes = load_gmdb()
    folds = np.array_split(np.random.default_rng(0).permutation(np.unique(subjects)), 5)
    hits = []
    for fold in folds:
        test = np.isin(subjects, fold)
        heads = train_heads(x[~test], y[~test], len(classes))
        hits.append(heads.probs(x[test])[:, 0].argmax(1) == y[test])
    top1 = float(np.concatenate(hits).mean())
    print(f"\nheads per-image top-1 (5-fold by subject): {top1:.3f}")
    assert top1 > 0.783


def test_with_heads_round_trip():
    import torch

    from shared.ml.gestalt import RegionalEnsemble, predict
    from shared.ml.heads import extract_features

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

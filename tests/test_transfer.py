"""Synthetic phenotypes: the ensemble learns landmark warps of real faces; each region sees what it contains.

The phenotype set (``shared.ml.warps``) is made from real faces that identity
pretraining tests do not use (ORL people s31-s40 and the colour photos): every face
appears once per class (``unaffected`` and two warps), so identity cannot give the class
away. Train and test faces are disjoint (by person for ORL, by photo for the colour set).
The eye warp lies inside ``upper_half`` and outside ``lower_half``; the philtrum warp the
other way round.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from shared.ml.data import IMAGE_SUFFIXES, Sample, scan_folder
from shared.ml.gestalt import predict
from shared.ml.training import SCRATCH_LR, PreparedData, TrainConfig, prepare, train_ensemble
from shared.ml.warps import BLIND_REGION, CONTAINING_REGION, UNAFFECTED, synthetic_phenotypes
from tests.conftest import TEST_SETTINGS, shared_data

REGIONS = ("full_face", "upper_half", "lower_half")
CLASSES = (UNAFFECTED, "hypertelorism", "long_philtrum")
WIDTH, EPOCHS, BATCH = 0.25, 15, 16
TEST_FRACTION = 0.3
SEED = 0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(int(TEST_SETTINGS["GESTALT_TORCH_THREADS"]))
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phenotypes():
    from shared.config import get_settings
    from shared.ml.preprocess import Preprocessor

    orl, people = shared_data("faces", "orl"), shared_data("faces", "people")
    base = [Sample(s.path, "face", s.label) for s in scan_folder(orl) if int(s.label[1:]) > 30]
    base += [Sample(p, "face", f"photo/{p.name}") for p in sorted(people.iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES]
    faces = prepare(base, ["face"], Preprocessor.from_settings(get_settings(), REGIONS), progress=False,
                    keep_aligned=True)
    syn = synthetic_phenotypes(faces.aligned, faces.landmarks, REGIONS, CLASSES, seed=SEED)
    groups = np.array([s.subject for s in faces.samples])
    rng = np.random.default_rng(SEED)
    held = set()
    for kind in ("s", "photo/"):  # the same share of ORL people and of colour photos
        unique = sorted({g for g in groups if g.startswith(kind)})
        held |= set(rng.choice(unique, size=round(TEST_FRACTION * len(unique)), replace=False))
    test_face = np.array([g in held for g in groups])
    samples = [Sample(faces.samples[i].path, CLASSES[lab], faces.samples[i].subject)
               for lab, i in zip(syn.labels, syn.source, strict=True)]
    return (PreparedData(syn.crops, syn.labels, samples), np.flatnonzero(~test_face[syn.source]).tolist(),
            np.flatnonzero(test_face[syn.source]).tolist())


@pytest.fixture(scope="module")
def results(phenotypes) -> dict:
    data, train_idx, test_idx = phenotypes
    cfg = TrainConfig(width=WIDTH, epochs=EPOCHS, batch_size=BATCH, lr=SCRATCH_LR, seed=SEED, progress=False)
    model, _ = train_ensemble(data, list(CLASSES), REGIONS, train_idx, [], cfg)
    pred = predict(model, data.crops[test_idx])
    y = data.labels[test_idx]
    out = {"aggregate": float((pred.aggregate.argmax(1) == y).mean()),
           "regions": {r: float((pred.region_probs[:, i].argmax(1) == y).mean()) for i, r in enumerate(REGIONS)},
           "auc": {}}
    # How well each region tells a warped face from an unaffected one: AUC of its probability for the warp.
    for c, warp in enumerate(CLASSES[1:], start=1):
        pos, neg = pred.region_probs[y == c][:, :, c], pred.region_probs[y == 0][:, :, c]
        out["auc"][warp] = {r: float(mannwhitneyu(pos[:, i], neg[:, i]).statistic / (len(pos) * len(neg)))
                            for i, r in enumerate(REGIONS)}
    print(f"test faces {len(test_idx) // len(CLASSES)}: aggregate {out['aggregate']:.3f}, "
          f"regions { {k: round(v, 3) for k, v in out['regions'].items()} }, "
          f"AUC { {w: {k: round(v, 3) for k, v in a.items()} for w, a in out['auc'].items()} }")
    return out


def test_train_and_test_faces_are_disjoint(phenotypes):
    data, train_idx, test_idx = phenotypes
    assert {data.samples[i].subject for i in train_idx}.isdisjoint({data.samples[i].subject for i in test_idx})
    assert not any(int(s.subject[1:]) <= 30 for s in data.samples if s.subject.startswith("s"))
    assert len(test_idx) >= 120 and len(train_idx) >= 300


def test_warps_are_learned(results):
    assert results["aggregate"] >= 0.55  # three classes: chance is 0.33


def test_aggregate_beats_the_weakest_region(results):
    assert results["aggregate"] >= min(results["regions"].values()) + 0.15, results


@pytest.mark.parametrize("warp", ["hypertelorism", "long_philtrum"])
def test_each_warp_is_best_seen_by_the_region_containing_it(results, warp):
    auc = results["auc"][warp]
    assert auc[CONTAINING_REGION[warp]] >= 0.60, auc
    assert auc[CONTAINING_REGION[warp]] >= auc[BLIND_REGION[warp]] + 0.10, auc

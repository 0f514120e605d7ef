"""Synthetic phenotypes: the ensemble learns landmark warps of real faces; each region sees what it contains;
identity pretraining helps when labelled faces are few.

The phenotype set (``shared.ml.train.warps``) is made from real faces that identity
pretraining tests do not use (ORL people s31-s40 and the colour photos): every face
appears once per class (``unaffected`` and two warps), so identity cannot give the class
away. Train and test faces are disjoint (by person for ORL, by photo for the colour set).
The eye warp lies inside ``upper_half`` and outside ``lower_half``; the philtrum warp the
other way round.

Transfer: region nets pretrained on face identification of ORL people s1-s30 (the paper's
first step, at ORL's scale), then fine-tuned on a few labelled faces, are compared with
nets trained from scratch on the same faces with the same optimizer, epochs and seed.
With only 30 identities behind them, the later conv pairs are specific to those people:
fine-tuning keeps the first ``TRANSFER_PAIRS`` (``gestalt train --transfer-pairs``). The transfer check
pretrains and fine-tunes the full-face network alone: it is the paper's first region, and one network instead of
three keeps the module's cost within a CI run on slower cores.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu

from shared.ml.nets.ensemble import predict_regions as predict
from shared.ml.train.data import IMAGE_SUFFIXES, Sample, scan_folder
from shared.ml.train.loop import load_pretrained, train_ensemble
from shared.ml.train.prepared import PreparedData, prepare
from shared.ml.train.pretrain import PretrainConfig, pretrain
from shared.ml.train.recipe import SCRATCH_LR, TrainConfig
from shared.ml.train.warps import BLIND_REGION, CONTAINING_REGION, UNAFFECTED, synthetic_phenotypes
from tests.conftest import shared_data

REGIONS = ("full_face", "upper_half", "lower_half")
CLASSES = (UNAFFECTED, "hypertelorism", "long_philtrum")
WIDTH, EPOCHS, BATCH = 0.25, 15, 16
TEST_FRACTION = 0.3
SEED = 0
# Identity pretraining of the full-face network, then small labelled sets of this many faces.
PRETRAIN = PretrainConfig(width=WIDTH, epochs=25, sgd_epochs=5, lr=2e-3, sgd_lr=1e-3, batch_size=16, seed=SEED)
SMALL_FACES, SMALL_SETS, SMALL_EPOCHS, TRANSFER_PAIRS = 12, 3, 60, 3
TRANSFER_REGIONS = REGIONS[:1]  # full_face


# Training here runs in the test process while the suite's workers sit idle, so it takes both cores (on one thread
# the module's fixtures took more than twice as long).
TRAIN_THREADS = 2


@pytest.fixture(scope="module", autouse=True)
def train_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def phenotypes():
    from shared.config import get_settings
    from shared.ml.preprocess.pipeline import Preprocessor

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


@pytest.fixture(scope="module")
def identity_checkpoint(tmp_path_factory) -> bytes:
    """Face identification on ORL people s1-s30, whom the phenotype set leaves out."""
    from shared.config import get_settings
    from shared.ml.preprocess.pipeline import Preprocessor

    samples = [s for s in scan_folder(shared_data("faces", "orl")) if int(s.label[1:]) <= 30]
    names = sorted({s.label for s in samples})
    data = prepare(samples, names, Preprocessor.from_settings(get_settings(), TRANSFER_REGIONS), progress=False)
    out = tmp_path_factory.mktemp("pretrain") / "orl-s1-s30.pt"
    _, metrics = pretrain(data, names, TRANSFER_REGIONS, PRETRAIN, out, progress=False)
    print("identity pretraining, held-out top-1:",
          {r: round(v["top1"], 3) for r, v in metrics["validation"]["regions"].items()})
    # The full-face network alone, on held-out photos of 30 people (chance: 0.03); it has read 0.87-0.93 on
    # different CPUs from the same seed.
    assert metrics["validation"]["aggregate"]["top1"] >= 0.8
    return out.read_bytes()


@pytest.fixture(scope="module")
def small_sets(phenotypes, identity_checkpoint) -> list[dict]:
    """Test accuracy from scratch and after pretraining, each trained on the same few labelled faces."""
    full, train_idx, test_idx = phenotypes
    data = PreparedData(full.crops[:, :len(TRANSFER_REGIONS)], full.labels, full.samples)
    faces = sorted({str(data.samples[i].path) for i in train_idx})
    out = []
    for k in range(SMALL_SETS):
        chosen = set(np.random.default_rng(SEED + k).choice(faces, SMALL_FACES, replace=False))
        idx = [i for i in train_idx if str(data.samples[i].path) in chosen]
        # The same optimizer, learning rate, epochs and seed for both: only the initial weights differ.
        cfg = TrainConfig(width=WIDTH, epochs=SMALL_EPOCHS, batch_size=BATCH, lr=SCRATCH_LR, seed=SEED + k,
                          progress=False)
        row = {"images": len(idx)}
        for name in ("scratch", "pretrained"):
            init = (load_pretrained(identity_checkpoint, len(CLASSES), TRANSFER_REGIONS,
                                    transfer_pairs=TRANSFER_PAIRS) if name == "pretrained" else None)
            model, _ = train_ensemble(data, list(CLASSES), TRANSFER_REGIONS, idx, [], cfg, init=init)
            row[name] = float((predict(model, data.crops[test_idx]).aggregate.argmax(1)
                               == data.labels[test_idx]).mean())
        print(f"{SMALL_FACES} labelled faces, set {k}: {row}")
        out.append(row)
    return out


def test_identity_pretraining_helps_on_a_small_labelled_set(small_sets):
    scratch = np.array([r["scratch"] for r in small_sets])
    pretrained = np.array([r["pretrained"] for r in small_sets])
    assert all(r["images"] == SMALL_FACES * len(CLASSES) for r in small_sets)
    assert pretrained.mean() >= scratch.mean() + 0.08, small_sets
    assert (pretrained > scratch).sum() >= SMALL_SETS - 1, small_sets  # not one lucky set

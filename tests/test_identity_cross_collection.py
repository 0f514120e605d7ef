"""The cross-collection check: a synthetic-phenotype classifier trained on one photo collection (ORL, grayscale,
92x112, one camera) and tested on another (the colour photos of faces/people, other cameras and people), and on
ORL people it never saw. Every member is built on the identity encoder (dlib's ResNet, learned on millions of
faces): the regional members on each region's cut, the identity member on the face chip. The paper's CASIA-Nets,
trained on the ORL photos alone, learned that collection's look and scored 0.48-0.63 per region on faces/people.

The task is the screening example's (docs/examples/make_screening_example.py): half of each person's
photos are warped to hypertelorism, the rest resampled, so only the geometry tells the labels apart.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from shared.ml.preprocess.pipeline import Preprocessor
from shared.ml.train.data import load_samples
from shared.ml.train.members import encoder_fn, fit_encoder_model, score_data
from shared.ml.train.modes import apply_label_map, binary_label_map
from shared.ml.train.prepared import prepare
from shared.ml.train.splits import subject_split
from tests.conftest import shared_data

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["hypertelorism", "others"]


def _prepared(folder: Path, name: str, pre: Preprocessor):
    samples = load_samples(folder / f"{name}.csv")
    samples, _ = apply_label_map(samples, CLASSES,
                                 {"label_map": binary_label_map({s.label for s in samples}, "hypertelorism")})
    return prepare(samples, CLASSES, pre, progress=False)


@pytest.fixture(scope="module")
def collections(tmp_path_factory):
    shared_data("faces", "orl")
    shared_data("faces", "people")
    spec = importlib.util.spec_from_file_location("make_screening", ROOT / "docs/examples/make_screening_example.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = tmp_path_factory.mktemp("screening")
    module.build(folder)
    pre = Preprocessor()
    sets = {name: _prepared(folder, name, pre) for name in ("train", "people", "orl-new-people")}
    return {**sets, "encode": encoder_fn("cpu")}


@pytest.fixture(scope="module")
def model(collections):
    from shared.ml.nets.encoder import CONVERTED_SHA256

    train = collections["train"]
    train_idx, val_idx = subject_split(train.samples, 0.17, seed=0)
    fitted, _ = fit_encoder_model(train, CLASSES, train_idx, val_idx, collections["encode"], CONVERTED_SHA256)
    return fitted


def _accuracy(model, data, encode) -> tuple[dict[str, float], dict[str, str], object]:
    from shared.ml.evaluate.statistics import proportion_of

    pred = score_data(model, data, np.arange(len(data.samples)), encode)
    hits = {n: pred.member_probs[:, i].argmax(1) == data.labels for i, n in enumerate(pred.names)}
    hits["aggregate"] = pred.aggregate.argmax(1) == data.labels
    accuracy = {n: float(h.mean()) for n, h in hits.items()}
    intervals = {n: f"{e.value:.3f} ({e.low:.3f}-{e.high:.3f})" for n, e in
                 ((n, proportion_of(h)) for n, h in hits.items())}
    return accuracy, intervals, pred


def test_every_member_carries_over_to_another_collection(collections, model):
    people = collections["people"]
    assert len(people.samples) >= 50 and set(people.labels.tolist()) == {0, 1}
    accuracy, intervals, pred = _accuracy(model, people, collections["encode"])
    print("faces/people (trained on ORL), correct calls with 95% CIs:", intervals, "weights",
          model.stack.share_of())
    for region in model.regions:
        assert accuracy[region] >= 0.80, (region, intervals)
    assert accuracy["identity"] >= 0.85
    assert accuracy["aggregate"] >= max(accuracy[n] for n in model.names)
    # The photos of another collection lie further from the training photos than held-out ORL photos do.
    from shared.ml.members.gallery import unit_concat

    distances = model.ood.distances(unit_concat([pred.descriptors[n] for n in model.gallery_names]))
    assert np.median(distances) > np.median(model.ood.reference)
    assert np.mean([s["percentile"] for s in pred.ood]) > 55


def test_the_aggregate_beats_its_best_member_on_new_people(collections, model):
    new = collections["orl-new-people"]
    accuracy, intervals, _ = _accuracy(model, new, collections["encode"])
    print("ORL people never trained on, correct calls with 95% CIs:", intervals)
    assert accuracy["aggregate"] > max(accuracy[n] for n in model.names), intervals

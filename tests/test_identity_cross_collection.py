"""Issue #16's cross-collection check: a synthetic-phenotype classifier trained on one photo collection
(ORL, grayscale, 92x112, one camera) and tested on another (the colour photos of faces/people, other
cameras and people). The identity member, a head on the face encoder's descriptors, must carry over
where the regional networks, trained on the ORL photos alone, learn that collection's look.

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
from shared.ml.train.loop import train_ensemble
from shared.ml.train.members import add_identity_member, member_probs
from shared.ml.train.modes import apply_label_map, binary_label_map
from shared.ml.train.prepared import prepare
from shared.ml.train.recipe import TrainConfig
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
    return {name: _prepared(folder, name, pre) for name in ("train", "people")}


def test_identity_member_carries_over_to_another_collection(collections):
    train = collections["train"]
    train_idx, val_idx = subject_split(train.samples, 0.17, seed=0)
    cfg = TrainConfig(width=0.25, epochs=6, batch_size=16, lr=1e-3, optimizer="adam", seed=0, progress=False)
    model, _ = train_ensemble(train, CLASSES, ("full_face", "upper_half", "middle_face", "lower_half"),
                              train_idx, val_idx, cfg)
    member = add_identity_member(model, train, train_idx, val_idx)
    assert member.head.selection["folds"] == 3 and 0.0 <= member.weight <= 1.0

    people = collections["people"]
    assert len(people.samples) >= 50 and set(people.labels.tolist()) == {0, 1}
    from shared.ml.train.members import describe_faces

    names, probs, weights = member_probs(model, people.crops, describe_faces(people))
    accuracy = {n: float((probs[:, i].argmax(1) == people.labels).mean()) for i, n in enumerate(names)}
    aggregate = np.einsum("nrc,r->nc", probs, np.asarray(weights))
    accuracy["aggregate"] = float((aggregate.argmax(1) == people.labels).mean())
    accuracy["regions (mean)"] = float((probs[:, :-1].mean(1).argmax(1) == people.labels).mean())
    print("accuracy on faces/people (trained on ORL):", {k: round(v, 3) for k, v in accuracy.items()},
          "identity weight", member.weight, "head", member.head.selection["chosen"])
    regional = [accuracy[n] for n in names if n != "identity"]
    assert accuracy["identity"] >= 0.85
    assert accuracy["identity"] > max(regional) + 0.1
    assert accuracy["aggregate"] > accuracy["regions (mean)"] + 0.1
    # The photos of another collection lie further from the training photos than held-out ORL photos do.
    ood = member.ood.score(people.descriptors)
    assert np.median(member.ood.distances(people.descriptors)) > np.median(member.ood.reference)
    assert np.mean([s["percentile"] for s in ood]) > 55

"""The identity member: heads on encoder descriptors, member weights, the OOD reference, checkpoints."""
from __future__ import annotations

import numpy as np
import pytest

from shared.ml.members import identity as idm
from shared.ml.members.model import predict
from shared.ml.nets.ensemble import RegionalEnsemble
from shared.ml.train.checkpoint import load_checkpoint, save_checkpoint


def _rings(n: int = 240, seed: int = 0):
    """Two classes a linear head cannot separate: an inner ball and a shell around it, in 16-d."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.arange(n) % 2
    x *= np.where(y == 0, 1.0, 2.5)[:, None] * rng.uniform(0.8, 1.2, size=(n, 1))
    return x.astype(np.float32), y


def test_head_choice_follows_the_folds():
    x, y = _rings()
    head = idm.fit_identity_head(x[:160], y[:160], 2, subjects=np.arange(160) // 2)
    cands = head.selection["candidates"]
    assert head.kind == "rbf", head.selection
    assert cands[head.selection["chosen"]]["macro_top1"] > cands["linear (C 1)"]["macro_top1"] + 0.2
    assert (head.probs(x[160:]).argmax(1) == y[160:]).mean() > 0.9
    # Linearly separable data keeps the simpler head when it scores as well.
    rng = np.random.default_rng(1)
    lin = rng.normal(size=(120, 8)).astype(np.float32)
    ly = (lin[:, 0] > 0).astype(int)
    lin[:, 0] += np.where(ly == 1, 3.0, -3.0)
    chosen = idm.fit_identity_head(lin, ly, 2, np.arange(120)).selection
    assert chosen["candidates"]["linear (C 1)"]["macro_top1"] == 1.0


def test_identity_weight_leans_on_the_encoder_within_one_standard_error():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    good = np.eye(3)[y] * 0.8 + 0.2 / 3
    noisy = rng.dirichlet(np.ones(3), size=200)
    regions = np.stack([noisy, noisy], axis=1)
    chosen = idm.choose_identity_weight(regions, good, y)
    assert chosen["weight"] == 1.0 and chosen["grid"][0.0] < 0.5
    # Regions that are right and an identity member that is noise: the weight goes to the regions.
    chosen = idm.choose_identity_weight(np.stack([good, good], axis=1), noisy, y)
    assert chosen["weight"] <= 0.5 and chosen["grid"][chosen["weight"]] >= chosen["best"] - chosen["se"]


def test_ood_reference_flags_far_descriptors():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 32)) + 5.0
    held = rng.normal(size=(100, 32)) + 5.0
    ref = idm.build_ood_reference(train, held)
    near = ref.score(rng.normal(size=(50, 32)) + 5.0)
    far = ref.score(rng.normal(size=(5, 32)) * 5.0 - 5.0)
    assert np.mean([s["unusual"] for s in near]) < 0.1
    assert all(s["unusual"] and s["percentile"] == 100.0 for s in far)


def test_member_survives_the_checkpoint_and_changes_the_aggregate():
    x, y = _rings(120)
    model = RegionalEnsemble(("full_face", "eyes"), 2, width=0.125)
    member = idm.build_member(x, y, 2, np.arange(80), np.arange(80, 120), np.arange(120),
                              region_val_probs=np.full((40, 2, 2), 0.5, np.float32), encoder_sha="abc")
    assert member.weight == 1.0  # regions at chance on validation
    model.identity = member
    loaded, state = load_checkpoint(save_checkpoint(model, ["a", "b"], {}))
    assert state["config"]["members"]["identity"]["weight"] == 1.0
    crops = np.random.default_rng(0).integers(0, 255, (40, 2, 100, 100), dtype=np.uint8)
    pred = predict(loaded, crops, descriptors=x[80:])
    np.testing.assert_allclose(pred.aggregate, member.head.probs(x[80:]), atol=1e-5)
    assert len(pred.ood) == 40 and {"distance", "percentile", "unusual"} <= set(pred.ood[0])
    plain = predict(loaded, crops)
    assert plain.identity_probs is None
    np.testing.assert_allclose(plain.aggregate, plain.region_probs.mean(1), atol=1e-6)
    names, stacked, weights = idm.member_scores(loaded.regions, pred.region_probs, pred.identity_probs, 1.0)
    assert names == ["full_face", "eyes", "identity"] and stacked.shape == (40, 3, 2)
    assert weights == pytest.approx([0.0, 0.0, 1.0])


def test_members_benchmark_reports_each_member_and_the_aggregate():
    from shared.ml.train.heads import HeadConfig, benchmark_members

    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(3), 40)
    subjects = np.arange(120) // 2
    identity = rng.normal(size=(120, 16)).astype(np.float32)
    identity[:, :3] += 2.5 * np.eye(3)[y]  # informative descriptors
    regions = rng.normal(size=(120, 2, 8)).astype(np.float32)  # uninformative region features
    out = benchmark_members(regions, identity, y, subjects, 3, ["full_face", "eyes"], folds=4,
                            cfg=HeadConfig(epochs=5, min_steps=50))
    assert set(out["members"]) == {"full_face", "eyes", "regions (mean)", "identity"}
    assert out["members"]["identity"]["top1"] > 0.8 > out["members"]["regions (mean)"]["top1"] + 0.2
    assert out["weight"] >= 0.5 and out["aggregate"]["top1"] >= out["members"]["identity"]["top1"] - 0.05


def test_gallery_matches_on_the_encoder_when_the_model_has_the_member():
    from shared.modelops.gallery import gallery_space

    regional = {"backbone_sha": "b" * 64, "regions": ["full_face", "eyes"]}
    assert gallery_space(regional) == ("b" * 64, ("full_face", "eyes"))
    with_member = {**regional, "members": {"identity": {"weight": 0.7, "encoder_sha": "e" * 64}}}
    assert gallery_space(with_member) == ("e" * 64, ("identity",))
    assert gallery_space(None) == (None, ())


def test_flip_average_descriptors_and_their_own_feature_key():
    from shared.ml.nets.encoder import encode, load_encoder

    model = load_encoder()
    chips = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
    both = encode(model, chips, flip=True)
    expected = (encode(model, chips) + encode(model, chips[:, :, ::-1].copy())) / 2
    np.testing.assert_allclose(both, expected, atol=1e-4)
    x, y = _rings(60)
    plain = idm.build_member(x, y, 2, np.arange(40), np.arange(40, 60), encoder_sha="e" * 64)
    flipped = idm.IdentityMember.from_state({**plain.state(), "flip": True})
    assert plain.feature_key == "e" * 64 and flipped.flip and len(flipped.feature_key) == 64
    assert flipped.feature_key != plain.feature_key

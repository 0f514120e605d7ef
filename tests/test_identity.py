"""Members on the identity encoder: heads on descriptors, the stack that weighs members, the OOD reference,
models of members through the checkpoint, and the gallery's descriptor space."""
from __future__ import annotations

import numpy as np
import pytest

from shared.ml.members import identity as idm
from shared.ml.members.casia import CasiaRegions, casia_only
from shared.ml.members.encoder_regions import EncoderRegions
from shared.ml.members.model import ENCODER, GestaltModel, gallery_model, predict
from shared.ml.members.stack import MEAN, Stack, fit_stack
from shared.ml.nets.ensemble import RegionalEnsemble
from shared.ml.preprocess.regions import cut_name
from shared.ml.train.checkpoint import load_checkpoint, save_checkpoint


def _rings(n: int = 240, seed: int = 0):
    """Two classes a linear head cannot separate: an inner ball and a shell around it, in 16-d."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = np.arange(n) % 2
    x *= np.where(y == 0, 1.0, 2.5)[:, None] * rng.uniform(0.8, 1.2, size=(n, 1))
    return x.astype(np.float32), y


def test_head_choice_follows_the_folds_and_keeps_its_out_of_fold_scores():
    x, y = _rings()
    head = idm.fit_identity_head(x[:160], y[:160], 2, subjects=np.arange(160) // 2)
    cands = head.selection["candidates"]
    assert head.kind == "rbf", head.selection
    assert cands[head.selection["chosen"]]["macro_top1"] > cands["linear (C 1)"]["macro_top1"] + 0.2
    assert (head.probs(x[160:]).argmax(1) == y[160:]).mean() > 0.9
    # The chosen candidate's out-of-fold scores are kept for a stack: as good as the folds said.
    assert head.oof.shape == (160, 2)
    assert (head.oof.argmax(1) == y[:160]).mean() == pytest.approx(cands[head.selection["chosen"]]["macro_top1"],
                                                                   abs=0.05)
    # Linearly separable data keeps the simpler head when it scores as well.
    rng = np.random.default_rng(1)
    lin = rng.normal(size=(120, 8)).astype(np.float32)
    ly = (lin[:, 0] > 0).astype(int)
    lin[:, 0] += np.where(ly == 1, 3.0, -3.0)
    chosen = idm.fit_identity_head(lin, ly, 2, np.arange(120)).selection
    assert chosen["candidates"]["linear (C 1)"]["macro_top1"] == 1.0


def _members(n: int, y: np.ndarray, errs: list[float], seed: int = 0) -> np.ndarray:
    """``N x M x 2`` scores of members that are each right on a random (1 - err) share of the photos, independently."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, len(errs), 2))
    for m, err in enumerate(errs):
        right = rng.random(n) > err
        called = np.where(right, y, 1 - y)
        conf = rng.uniform(0.55, 0.95, n)
        out[np.arange(n), m, called] = conf
        out[np.arange(n), m, 1 - called] = 1 - conf
    return out


def test_stack_weighs_members_and_beats_the_best_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    probs = _members(2000, y, [0.15, 0.18, 0.2, 0.5])  # three members that err apart, one at chance
    stack = fit_stack(probs[:1000], y[:1000], ("a", "b", "c", "noise"), "test")
    shares = stack.share_of()
    assert shares["noise"] < 0.05 and shares["a"] > shares["c"], shares
    held = stack.combine(probs[1000:])
    best = max((probs[1000:, m].argmax(1) == y[1000:]).mean() for m in range(3))
    assert (held.argmax(1) == y[1000:]).mean() > best + 0.02
    np.testing.assert_allclose(held.sum(1), 1.0, atol=1e-5)
    # Too few photos, or one class among them: equal weights, said so.
    few = fit_stack(probs[:5], y[:5], ("a", "b", "c", "noise"))
    assert few.weights.tolist() == [0.25] * 4 and "equal" in few.fit["source"]
    # The legacy rule (checkpoint format 1): a weighted mean of probabilities.
    mean = Stack(("a", "b"), np.array([0.25, 0.75]), None, MEAN)
    np.testing.assert_allclose(mean.combine(probs[:3, :2]), 0.25 * probs[:3, 0] + 0.75 * probs[:3, 1], atol=1e-6)


def test_ood_reference_flags_far_descriptors():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(300, 32)) + 5.0
    held = rng.normal(size=(100, 32)) + 5.0
    ref = idm.build_ood_reference(train, held)
    near = ref.score(rng.normal(size=(50, 32)) + 5.0)
    far = ref.score(rng.normal(size=(5, 32)) * 5.0 - 5.0)
    assert np.mean([s["unusual"] for s in near]) < 0.1
    assert all(s["unusual"] and s["percentile"] == 100.0 for s in far)


class _FakeEncoder:
    """A stand-in for the identity encoder: fixed random projections of a crop's mean colours (whole, top, bottom,
    left half; the mirror's left half is the right half), deterministic descriptors and stage features."""

    def __init__(self, dim: int = 16):
        rng = np.random.default_rng(7)
        self.proj, self.feature_proj = rng.normal(size=(12, dim)), rng.normal(size=(12, 2 * dim))
        self.calls: list[int] = []

    def _pattern(self, chips: np.ndarray, flip: bool) -> np.ndarray:
        x = chips.astype(np.float32) / 255.0
        parts = [x.mean((1, 2)), x[:, :75].mean((1, 2)), x[:, 75:].mean((1, 2))]
        own = np.concatenate([*parts, x[:, :, :75].mean((1, 2))], 1)
        return (own + np.concatenate([*parts, x[:, :, 75:].mean((1, 2))], 1)) / 2 if flip else own

    def __call__(self, chips: np.ndarray, flip: bool) -> np.ndarray:
        return (self._pattern(chips, flip) @ self.proj).astype(np.float32)

    def run(self, chips: np.ndarray, flip: bool, block=None):
        from shared.ml.nets.encoder_runner import EncoderOutput

        self.calls.append(len(chips))
        pattern = self._pattern(chips, flip)
        return EncoderOutput((pattern @ self.proj).astype(np.float32), (pattern @ self.feature_proj).astype(np.float32))


def test_a_model_of_members_scores_through_one_orchestrator_and_survives_its_checkpoint():
    rng = np.random.default_rng(0)
    n, regions = 60, ("full_face", "upper_half")
    crops = {"face_chip": rng.integers(0, 256, (n, 150, 150, 3), dtype=np.uint8),
             **{cut_name(r): rng.integers(0, 256, (n, 150, 150, 3), dtype=np.uint8) for r in regions},
             **{r: rng.integers(0, 256, (n, 100, 100), dtype=np.uint8) for r in regions}}
    encode = _FakeEncoder()
    desc = {"identity": encode(crops["face_chip"], True),
            **{r: encode.run(crops[cut_name(r)], True).features for r in regions}}
    y = (desc["identity"][:, 0] > np.median(desc["identity"][:, 0])).astype(int)
    heads = {k: idm.fit_identity_head(v, y, 2, np.arange(n)) for k, v in desc.items()}
    members = [EncoderRegions(regions, {r: heads[r] for r in regions}, "e" * 64, True),
               idm.IdentityMember(heads["identity"], "e" * 64, {}, True)]
    stack = Stack((*regions, "identity"), np.array([0.2, 0.3, 0.5]), np.zeros(2))
    model = GestaltModel(["a", "b"], members, stack, ENCODER, descriptor_names=(*regions, "identity"),
                         encoder_sha="e" * 64, gallery_names=("identity",))
    encode.calls.clear()
    pred = predict(model, crops, encode)
    assert encode.calls == [3 * n]  # one encoder pass over every crop the members and the descriptors read
    assert pred.names == ("full_face", "upper_half", "identity") and pred.member_probs.shape == (n, 3, 2)
    np.testing.assert_allclose(pred.member_probs[:, 2], heads["identity"].probs(desc["identity"]), atol=1e-5)
    np.testing.assert_allclose(pred.aggregate, stack.combine(pred.member_probs), atol=1e-5)
    assert {k: v.shape for k, v in pred.descriptors.items()} == {"full_face": (n, 32), "upper_half": (n, 32),
                                                                  "identity": (n, 16)}
    assert pred.scores[1].feature_key == model.descriptor_key == model.key_of("identity")
    assert pred.scores[0].feature_key == model.key_of("full_face") != model.descriptor_key
    loaded, state = load_checkpoint(save_checkpoint(model, {"m": 1}))
    assert [m.kind for m in loaded.members] == ["encoder_regions", "identity"]
    again = predict(loaded, crops, encode)
    np.testing.assert_allclose(again.aggregate, pred.aggregate, atol=1e-6)
    assert loaded.config["weights"] == {"full_face": 0.2, "upper_half": 0.3, "identity": 0.5}
    assert loaded.config["descriptors"]["gallery"] == ["identity"]
    # A model of CASIA-Nets needs no encoder; the gallery model keeps descriptors and ranks nothing.
    casia = casia_only(RegionalEnsemble(regions, 2, width=0.125).eval(), ["a", "b"])
    assert not casia.needs_encoder and predict(casia, crops, None).member_probs.shape == (n, 2, 2)
    gallery = predict(gallery_model("e" * 64, regions), crops, encode)
    assert gallery.member_probs.shape == (n, 0, 0) and set(gallery.descriptors) == {*regions, "identity"}


def test_a_format_1_checkpoint_loads_as_its_equivalent_model():
    """Models saved before members were combined by a stack keep scoring as they did."""
    import io

    import torch

    x, y = _rings(60)
    net = RegionalEnsemble(("full_face",), 2, width=0.125).eval()
    head = idm.fit_identity_head(x, y, 2, np.arange(60))
    legacy = {"format": 1, "arch": net.arch, "config": net.config, "class_names": ["a", "b"],
              "state_dict": net.state_dict(), "metrics": {}, "extra": {},
              "members": {"identity": {"head": head.state(), "weight": 0.75, "encoder_sha": "e" * 64,
                                       "ood": None, "validation": {}, "flip": False}}}
    buf = io.BytesIO()
    torch.save(legacy, buf)
    model, _ = load_checkpoint(buf.getvalue())
    assert isinstance(model.members[0], CasiaRegions) and model.stack.kind == MEAN
    assert model.stack.share_of() == {"full_face": 0.25, "identity": 0.75}
    crops = {"full_face": np.zeros((4, 100, 100), np.uint8), "face_chip": np.zeros((4, 150, 150, 3), np.uint8)}
    class Chips:
        def run(self, chips, flip, block=None):
            from shared.ml.nets.encoder_runner import EncoderOutput

            return EncoderOutput(x[:len(chips)], np.zeros((len(chips), 256), np.float32))

    pred = predict(model, crops, Chips())
    np.testing.assert_allclose(pred.aggregate, 0.25 * pred.member_probs[:, 0] + 0.75 * pred.member_probs[:, 1],
                               atol=1e-5)


def test_members_benchmark_reports_each_member_and_an_out_of_fold_stack():
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
    assert out["weights"]["identity"] > 0.5
    assert out["aggregate"]["top1"] >= out["members"]["identity"]["top1"] - 0.05


def test_gallery_space_follows_the_version_config():
    from shared.modelops.gallery import gallery_space

    regional = {"backbone_sha": "b" * 64, "regions": ["full_face", "eyes"]}
    assert gallery_space(regional) == (("full_face", "b" * 64), ("eyes", "b" * 64))
    legacy = {**regional, "members": {"identity": {"weight": 0.7, "encoder_sha": "e" * 64}}}
    assert gallery_space(legacy) == (("identity", "e" * 64),)
    chosen = {"descriptors": {"feature_key": "k" * 64, "names": ["full_face", "identity"],
                              "keys": {"full_face": "f" * 64, "identity": "k" * 64},
                              "gallery": ["identity", "full_face"]}}
    assert gallery_space(chosen) == (("identity", "k" * 64), ("full_face", "f" * 64))
    assert gallery_space(None) == ()


def test_flip_average_descriptors_and_their_own_feature_key():
    from shared.ml.nets.encoder import encode, load_encoder

    model = load_encoder()
    chips = np.random.default_rng(0).integers(0, 256, (3, 150, 150, 3), dtype=np.uint8)
    both = encode(model, chips, flip=True)
    expected = (encode(model, chips) + encode(model, chips[:, :, ::-1].copy())) / 2
    np.testing.assert_allclose(both, expected, atol=1e-4)
    x, y = _rings(60)
    plain = idm.IdentityMember(idm.fit_identity_head(x, y, 2), "e" * 64)
    flipped = idm.IdentityMember.from_state({**plain.state(), "flip": True})
    assert plain.feature_key == "e" * 64 and flipped.flip and len(flipped.feature_key) == 64
    assert flipped.feature_key != plain.feature_key

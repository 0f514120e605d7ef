"""Inference: batching many faces, precision, memory layout, compile, flip TTA, and one load per process."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.ml.members.casia import casia_only
from shared.ml.nets.ensemble import RegionalEnsemble, predict_regions, prepare_for_inference
from shared.ml.train.checkpoint import load_checkpoint, save_checkpoint

REGIONS = ("full_face", "upper_half", "lower_half")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = RegionalEnsemble(REGIONS, num_classes=5, width=0.125)
    # Non-trivial batch-norm statistics, as a trained model has.
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(8, len(REGIONS), 1, 100, 100))
    return prepare_for_inference(m, "cpu")


@pytest.fixture(scope="module")
def crops():
    return np.random.default_rng(0).integers(0, 256, (7, len(REGIONS), 100, 100), dtype=np.uint8)


def test_prediction_fields(model, crops):
    pred = predict_regions(model, crops)
    assert pred.region_probs.shape == (7, 3, 5) and pred.aggregate.shape == (7, 5)
    assert pred.features.shape == (7, 3, model.nets["full_face"].num_features)
    np.testing.assert_allclose(pred.region_probs.sum(-1), 1, atol=1e-5)
    np.testing.assert_allclose(pred.aggregate, pred.region_probs.mean(1), atol=1e-6)
    # Batching many faces gives what one face at a time gives.
    one_by_one = [predict_regions(model, crops[i:i + 1]) for i in range(len(crops))]
    small_batches = predict_regions(model, crops, batch_size=3)
    np.testing.assert_allclose(small_batches.region_probs, np.concatenate([p.region_probs for p in one_by_one]),
                               atol=1e-5)
    np.testing.assert_allclose(small_batches.features, pred.features, atol=1e-4)
    empty = predict_regions(model, crops[:0])
    assert empty.region_probs.shape == (0, 3, 5) and empty.aggregate.shape == (0, 5)


def test_flip_tta_averages_the_crop_and_its_mirror(model, crops):
    plain = predict_regions(model, crops)
    mirrored = predict_regions(model, np.ascontiguousarray(crops[..., ::-1]))
    tta = predict_regions(model, crops, batch_size=4, flip_tta=True)
    np.testing.assert_allclose(tta.region_probs, (plain.region_probs + mirrored.region_probs) / 2, atol=1e-5)
    np.testing.assert_allclose(tta.aggregate, tta.region_probs.mean(1), atol=1e-6)
    np.testing.assert_allclose(tta.features, plain.features, atol=1e-4)  # the features of the crop as given
    assert not np.allclose(tta.region_probs, plain.region_probs, atol=1e-4)


def test_bf16_and_channels_last_agree_with_fp32(model, crops):
    fp32 = predict_regions(model, crops, precision="fp32")
    bf16 = predict_regions(model, crops, precision="bf16")
    np.testing.assert_allclose(bf16.region_probs, fp32.region_probs, atol=0.05)
    assert (bf16.aggregate.argmax(1) == fp32.aggregate.argmax(1)).mean() >= 0.7
    assert model.channels_last  # the default layout
    assert model.nets["full_face"].features[0].weight.is_contiguous(memory_format=torch.channels_last)
    prepare_for_inference(model, channels_last=False)
    try:
        assert model.nets["full_face"].features[0].weight.is_contiguous()
        np.testing.assert_allclose(predict_regions(model, crops, precision="fp32").region_probs, fp32.region_probs,
                                   atol=1e-5)
    finally:
        prepare_for_inference(model)
    with pytest.raises(ValueError):
        predict_regions(model, crops, precision="fp16")


def test_compiled_model_matches_eager(model, crops):
    data = save_checkpoint(casia_only(model, [f"s{i}" for i in range(5)]), {})
    compiled = load_checkpoint(data, "cpu", compile=True)[0].member("casia").net
    assert compiled.compiled is not None
    np.testing.assert_allclose(predict_regions(compiled, crops[:2], precision="fp32").region_probs,
                               predict_regions(model, crops[:2], precision="fp32").region_probs, atol=1e-4)


def test_model_cache_loads_a_version_once(engines):
    """The worker's ModelCache downloads and loads the active version once, and again only after a switch."""
    from shared.db import session_scope
    from shared.modelops import registry
    from shared.storage import Storage, get_storage

    class CountingStorage(Storage):
        def __init__(self, inner: Storage):
            self.client, self.bucket, self.gets = inner.client, inner.bucket, 0

        def get(self, key: str) -> bytes:
            self.gets += 1
            return super().get(key)

    storage = CountingStorage(get_storage())
    torch.manual_seed(1)
    versions = []
    with session_scope() as s:
        before = registry.active_version(s)
        before = before.id if before else None
        for name in ("cache-a", "cache-b"):
            net = RegionalEnsemble(REGIONS, 2, width=0.125)
            v = registry.register_model(s, storage, casia_only(net, ["ca", "cb"]), {}, name=name)
            versions.append(v.id)
        registry.activate(s, s.get(registry.ModelVersion, versions[0]))
    cache = registry.ModelCache(check_seconds=0.0)
    with session_scope() as s:
        first = cache.active(s, storage)
        for _ in range(3):
            assert cache.active(s, storage) is first
    assert storage.gets == 1 and first.name == "cache-a" and not first.model.member("casia").net.training
    with session_scope() as s:
        registry.activate(s, s.get(registry.ModelVersion, versions[1]))
    with session_scope() as s:
        assert cache.active(s, storage).name == "cache-b"
        assert cache.active(s, storage).name == "cache-b"
    assert storage.gets == 2
    if before is not None:  # leave the active model as the other tests of the session had it
        with session_scope() as s:
            registry.activate(s, s.get(registry.ModelVersion, before))

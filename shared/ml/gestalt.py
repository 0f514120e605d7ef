"""The regional ensemble: one CASIA-Net per region, region softmaxes averaged into a ranking."""
from __future__ import annotations

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

    @property
    def config(self) -> dict:
        return {"regions": list(self.regions), "num_classes": self.num_classes, "width": self.width}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``N x R x C`` for crops ``N x R x 1 x H x W``."""
        return torch.stack([self.nets[r](x[:, i]) for i, r in enumerate(self.regions)], dim=1)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, feats = [], []
        for i, r in enumerate(self.regions):
            f = self.nets[r].forward_features(x[:, i])
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
    aggregate: np.ndarray  # N x C, mean of the region softmaxes
    features: np.ndarray  # N x R x F


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@torch.inference_mode()
def predict(model: RegionalEnsemble, crops: np.ndarray, batch_size: int = 256) -> Prediction:
    """Scores for many faces at once.

    Args:
        model: the ensemble, in eval mode, on its device.
        crops: ``N x R x 100 x 100`` uint8, regions in ``model.regions`` order.
        batch_size: faces per forward pass.
    """
    device = next(model.parameters()).device
    probs, feats = [], []
    for start in range(0, len(crops), batch_size):
        x = crops_to_tensor(crops[start:start + batch_size]).to(device, non_blocking=True)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                logits, f = model.forward_with_features(x)
        else:
            logits, f = model.forward_with_features(x)
        probs.append(torch.softmax(logits.float(), dim=-1).cpu())
        feats.append(f.float().cpu())
    region_probs = torch.cat(probs).numpy()
    return Prediction(region_probs=region_probs, aggregate=region_probs.mean(axis=1),
                      features=torch.cat(feats).numpy())


def rank(aggregate: np.ndarray, classes: list[dict]) -> list[dict]:
    """All classes, best first, as ``{"rank", "syndrome_id", "name", "score"}``."""
    order = np.argsort(-aggregate, kind="stable")
    return [{"rank": i + 1, "syndrome_id": classes[j]["syndrome_id"], "name": classes[j]["name"],
             "score": float(aggregate[j])} for i, j in enumerate(order)]


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
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def load_checkpoint(data: bytes, device: torch.device | str = "cpu") -> tuple[RegionalEnsemble, dict]:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"unsupported checkpoint format {state.get('format')!r}")
    cfg = state["config"]
    model = RegionalEnsemble(tuple(cfg["regions"]), cfg["num_classes"], state["arch"], cfg["width"])
    model.load_state_dict(state["state_dict"])
    model.eval().to(device)
    if torch.device(device).type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, state

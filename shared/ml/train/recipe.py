"""The training recipe: learning rates and presets, :class:`TrainConfig`, the optimizers, the paper's
augmentation, class weights against imbalance, and seeding."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torchvision.transforms import v2

# The paper's fine-tuning recipe: a new final layer, Xavier-normal at this gain, trained with SGD.
FINETUNE_HEAD_GAIN = 0.3
FINETUNE_LR = 5e-3
SCRATCH_LR = 1e-3
MOMENTUM = 0.9


# `gestalt train --preset NAME`: defaults for width, epochs and batch size (options given explicitly win).
PRESETS = {
    "cpu-small": {"width": 0.25, "epochs": 8, "batch_size": 16},
    "paper": {"width": 1.0, "epochs": 40, "batch_size": 32},
}


@dataclass
class TrainConfig:
    width: float = 1.0
    epochs: int = 40
    batch_size: int = 32
    lr: float = SCRATCH_LR
    weight_decay: float = 5e-4
    # "adam" trains from scratch; "sgd" (momentum 0.9, no weight decay) is the paper's fine-tuning recipe.
    optimizer: str = "adam"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    # The best epoch is the one with the highest validation top-k at this k (ties: lower k, then loss).
    select_topk: int = 1
    augment: bool = True
    # Early stopping: stop after this many epochs without a better validation score (0: run every epoch).
    patience: int = 0


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def augmentation() -> v2.Transform:
    """The paper's augmentation: rotation 5 deg, shifts 0.05, shear 5 deg, zoom 0.05, horizontal flip."""
    return v2.Compose([
        v2.RandomAffine(degrees=5, translate=(0.05, 0.05), scale=(0.95, 1.05), shear=5),
        v2.RandomHorizontalFlip(),
    ])


def make_optimizer(params, name: str, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9 and no weight decay (the paper's fine-tuning and second pretraining phase)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM, weight_decay=0.0)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r} (adam or sgd)")


def class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """Inverse-frequency weights with mean 1 over the present classes, against class imbalance."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / num_classes, 0.0)
    return torch.as_tensor(weights, dtype=torch.float32)

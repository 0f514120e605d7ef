"""Training data, subject-disjoint splits and the training loop of the regional ensemble."""
from __future__ import annotations

import copy
import hashlib
import logging
import random
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from shared.ml.data import Sample
from shared.ml.evaluation import topk_hits
from shared.ml.gestalt import RegionalEnsemble, crops_to_tensor, predict
from shared.ml.imaging import ImageRejected, decode_upload
from shared.ml.preprocess import Preprocessor

logger = logging.getLogger(__name__)

@dataclass
class PreparedData:
    crops: np.ndarray  # N x R x 100 x 100 uint8
    labels: np.ndarray  # N int64
    samples: list[Sample]
    rejected: list[tuple[Sample, str]] = field(default_factory=list)
    aligned: np.ndarray | None = None  # N x 200 x 200 uint8 aligned grayscale faces (keep_aligned=True)


def prepare(samples: list[Sample], class_names: list[str], preprocessor: Preprocessor,
            max_bytes: int = 50 * 2**20, max_pixels: float = 4e7, progress: bool = True,
            keep_aligned: bool = False) -> PreparedData:
    """Decode, detect, align and crop every sample, as the worker does for an upload.

    Raises:
        ValueError: when a sample's label is not in ``class_names`` (all unknown labels are listed).
    """
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise ValueError(f"{len(unknown)} unknown label(s): {', '.join(unknown[:20])}")
    crops, labels, kept, rejected, aligned = [], [], [], [], []
    for s in tqdm(samples, desc="preprocess", unit="img", disable=not progress):
        try:
            decoded = decode_upload(s.path.read_bytes(), max_bytes=max_bytes, max_pixels=max_pixels, min_side=32)
            result = preprocessor.run(decoded.rgb)
        except ImageRejected as exc:
            rejected.append((s, exc.reason))
            continue
        crops.append(np.stack([result.aligned.crops[r] for r in preprocessor.regions]))
        labels.append(index[s.label])
        kept.append(s)
        if keep_aligned:
            aligned.append(cv2.cvtColor(result.aligned.aligned_rgb, cv2.COLOR_RGB2GRAY))
    if not crops:
        raise ValueError("no usable face in the data")
    return PreparedData(np.stack(crops), np.asarray(labels, np.int64), kept, rejected,
                        np.stack(aligned) if keep_aligned else None)


@dataclass
class TrainConfig:
    width: float = 1.0
    epochs: int = 40
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 5e-4
    # "adam" trains from scratch; "sgd" (momentum 0.9, no weight decay) is the paper's fine-tuning recipe.
    optimizer: str = "adam"
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


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


def evaluate(model: RegionalEnsemble, crops: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict:
    """Top-k of each region and of the aggregate (the paper's Table 2 layout)."""
    model.eval()
    pred = predict(model, crops)
    out: dict = {"n": int(len(labels)), "aggregate": {}, "regions": {}}
    for k in ks:
        out["aggregate"][f"top{k}"] = float(topk_hits(pred.aggregate, labels, k).mean())
    for i, r in enumerate(model.regions):
        out["regions"][r] = {f"top{k}": float(topk_hits(pred.region_probs[:, i], labels, k).mean()) for k in ks}
    return out


def train_ensemble(data: PreparedData, class_names: list[str], regions: tuple[str, ...], train_idx: list[int],
                   val_idx: list[int], cfg: TrainConfig,
                   init: RegionalEnsemble | None = None) -> tuple[RegionalEnsemble, dict]:
    """Train one CASIA-Net per region on the same faces; keep the epoch with the best validation top-1.

    Args:
        init: fine-tune this ensemble (its heads must already have ``len(class_names)`` outputs)
            instead of training a new one from scratch.

    Returns:
        The trained ensemble (CPU, eval mode) and its metrics.
    """
    seed_everything(cfg.seed)
    device = torch.device(cfg.device)
    model = (copy.deepcopy(init) if init is not None
             else RegionalEnsemble(regions, len(class_names), width=cfg.width)).to(device)
    x_train = torch.as_tensor(data.crops[train_idx])
    y_train = torch.as_tensor(data.labels[train_idx])
    # Class weights against imbalance: inverse frequency, mean 1.
    counts = np.bincount(data.labels[train_idx], minlength=len(class_names)).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(class_names), 0.0)
    loss_fn = nn.CrossEntropyLoss(weight=torch.as_tensor(weights, dtype=torch.float32, device=device))
    if cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=0.0)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs))
    aug = augmentation()
    generator = torch.Generator().manual_seed(cfg.seed)
    history, best, best_state = [], None, None
    for epoch in tqdm(range(cfg.epochs), desc="train", unit="epoch", disable=not cfg.progress):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total, seen = 0.0, 0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:
                continue  # batch norm needs two samples
            # One random transform per face, shared by its regions (they come from one aligned canvas).
            xb = torch.stack([aug(x_train[i]) for i in idx.tolist()])
            x = crops_to_tensor(xb).to(device)
            y = y_train[idx].to(device)
            logits = model(x)
            loss = sum(loss_fn(logits[:, r], y) for r in range(len(regions)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        scheduler.step()
        entry = {"epoch": epoch + 1, "loss": total / max(seen, 1) / len(regions)}
        if val_idx:
            metrics = evaluate(model, data.crops[val_idx], data.labels[val_idx], ks=(1, 5))
            entry.update(val_top1=metrics["aggregate"]["top1"], val_top5=metrics["aggregate"]["top5"])
            score = (entry["val_top1"], entry["val_top5"], -entry["loss"])
            if best is None or score >= best:
                best = score
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                entry["best"] = True
        history.append(entry)
        logger.info("train epoch=%d %s", epoch + 1, " ".join(f"{k}={v:.4f}" for k, v in entry.items()
                                                             if isinstance(v, float)))
    if best_state is not None:
        model.load_state_dict(best_state)
    model = model.cpu().eval()
    metrics = {
        "train": {"n": len(train_idx), "subjects": len({data.samples[i].subject for i in train_idx})},
        "history": history,
        "config": {"width": cfg.width, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
                   "weight_decay": cfg.weight_decay, "seed": cfg.seed},
    }
    if val_idx:
        metrics["validation"] = evaluate(model, data.crops[val_idx], data.labels[val_idx])
        metrics["validation"]["subjects"] = len({data.samples[i].subject for i in val_idx})
    return model, metrics


def data_hash(samples: list[Sample]) -> str:
    """A short fingerprint of the training set (paths, labels, subjects)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.label}\0{s.subject}\0{s.path.name}\n".encode())
    return h.hexdigest()[:16]

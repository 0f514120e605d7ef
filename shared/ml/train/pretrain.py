"""Face-identification pretraining of the region nets (the paper's first training step).

Each region's CASIA-Net learns to tell identities apart from its own crops of an
identity-labelled set (CASIA-WebFace layout: one folder per identity). The recipe is the
paper's: He-normal initialisation, cross-entropy, Adam at 1e-3 for 40 epochs, then SGD at
1e-4 with momentum 0.9 for 10 more, on a random 90/10 split of each identity's images.

The output is an ordinary checkpoint (``gestalt train --init`` fine-tunes it) that also
carries the epoch, the optimizer state and the random state, rewritten after every epoch
(to a temp file, then replaced), so an interrupted run resumes where it stopped.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from shared.ml.nets.ensemble import RegionalEnsemble
from shared.ml.train.checkpoint import CASIA_FORMAT, read_state, write_state
from shared.ml.train.loop import evaluate, train_epoch
from shared.ml.train.prepared import PreparedData
from shared.ml.train.recipe import augmentation, class_weights, make_optimizer, seed_everything
from shared.ml.train.splits import subject_split

logger = logging.getLogger(__name__)

CHECKPOINT_KIND = "pretrain"


@dataclass
class PretrainConfig:
    width: float = 1.0
    epochs: int = 40  # Adam phase
    sgd_epochs: int = 10  # then SGD with momentum 0.9
    batch_size: int = 64
    lr: float = 1e-3
    sgd_lr: float = 1e-4
    weight_decay: float = 0.0
    val_fraction: float = 0.1  # of each identity's images
    augment: bool = True
    seed: int = 0

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.sgd_epochs

    def phase(self, epoch: int) -> str:
        """The optimizer of 0-based ``epoch``."""
        return "adam" if epoch < self.epochs else "sgd"

    def lr_of(self, phase: str) -> float:
        return self.lr if phase == "adam" else self.sgd_lr


def identity_split(data: PreparedData, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Train and validation images; every identity with two or more images has some of each.

    Each image counts as its own subject here: the task is to recognise a known person in
    photos that training did not see.
    """
    from shared.ml.train.data import Sample

    per_image = [Sample(s.path, s.label, f"{i}") for i, s in enumerate(data.samples)]
    return subject_split(per_image, val_fraction, seed)


def _fingerprint(class_names: list[str], regions: tuple[str, ...], width: float, train_idx: list[int],
                 val_idx: list[int]) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {"class_names": list(class_names), "regions": list(regions), "width": width,
            "train_idx": [int(i) for i in train_idx], "val_idx": [int(i) for i in val_idx]}


def pretrain(data: PreparedData, class_names: list[str], regions: tuple[str, ...], cfg: PretrainConfig,
             output: Path, device: str = "cpu", progress: bool = True) -> tuple[RegionalEnsemble, dict]:
    """Train (or resume training) one identity classifier per region; checkpoint after every epoch.

    Args:
        data: crops ``N x R x 100 x 100`` with identity labels.
        class_names: the identities, in label order.
        regions: the regions of ``data.crops``, in order.
        cfg: the recipe. ``epochs``/``sgd_epochs`` may grow between runs; the rest must match to resume.
        output: the checkpoint file; when it exists, training resumes from its epoch.

    Returns:
        The model (CPU, eval mode) and its metrics: ``history`` (one entry per epoch, across
        runs), ``validation`` (per-region and aggregate identity top-k on held-out images),
        ``resumed_from`` (the epoch the run started at).
    """
    train_idx, val_idx = identity_split(data, cfg.val_fraction, cfg.seed)
    fingerprint = _fingerprint(class_names, regions, cfg.width, train_idx, val_idx)
    seed_everything(cfg.seed)
    dev = torch.device(device)
    model = RegionalEnsemble(regions, len(class_names), width=cfg.width).to(dev)
    generator = torch.Generator().manual_seed(cfg.seed)
    start, history, opt_state, opt_phase = _resume(output, fingerprint, model, generator)
    x_train = torch.as_tensor(data.crops[train_idx])
    y_train = torch.as_tensor(data.labels[train_idx])
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(data.labels[train_idx], len(class_names)).to(dev))
    aug = augmentation() if cfg.augment else None
    optimizer, phase, last = None, None, None
    for epoch in tqdm(range(start, cfg.total_epochs), desc="pretrain", unit="epoch", initial=start,
                      total=cfg.total_epochs, disable=not progress):
        if cfg.phase(epoch) != phase:
            phase = cfg.phase(epoch)
            optimizer = _phase_optimizer(model, cfg, phase, opt_state if opt_phase == phase else None)
        loss = train_epoch(model, x_train, y_train, loss_fn, optimizer, cfg.batch_size, generator, aug, dev,
                           progress=progress)
        entry = {"epoch": epoch + 1, "phase": phase, "loss": loss}
        if val_idx:
            entry.update(_validation_top1(model, data, val_idx))
        history.append(entry)
        logger.info("pretrain epoch=%d phase=%s loss=%.4f val_top1=%.4f", epoch + 1, phase, loss,
                    entry.get("val_top1", float("nan")))
        last = _state(model, class_names, cfg, fingerprint, epoch + 1, phase, optimizer, generator,
                      {"history": history}, holdout=[str(data.samples[i].path) for i in val_idx])
        write_state(output, last)
    model = model.cpu().eval()
    metrics = _final_metrics(model, data, train_idx, val_idx, len(class_names), history, start)
    if last is not None:  # the final checkpoint also records the held-out accuracy
        last["metrics"] = metrics
        write_state(output, last)
    return model, metrics


def _resume(output: Path, fingerprint: dict, model: RegionalEnsemble,
            generator: torch.Generator) -> tuple[int, list[dict], dict | None, str | None]:
    """Continue from the checkpoint at ``output``, if there is one: loads the weights and the random state
    into ``model`` and ``generator``.

    Returns:
        The epoch to start at, the history so far, and the optimizer's state with its phase (None, None
        for a fresh run).
    """
    state = read_state(output, CHECKPOINT_KIND, "a pretraining checkpoint")
    if state is None:
        return 0, [], None, None
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"{output} was written for other data, regions, width, seed or split; "
                         "remove it or choose another output file")
    model.load_state_dict(state["state_dict"])
    torch.set_rng_state(state["rng"])
    generator.set_state(state["generator"])
    logger.info("pretrain resume epoch=%d path=%s", int(state["epoch"]), output)
    return int(state["epoch"]), list(state["metrics"]["history"]), state["optimizer"], state["phase"]


def _phase_optimizer(model: RegionalEnsemble, cfg: PretrainConfig, phase: str,
                     saved: dict | None) -> torch.optim.Optimizer:
    """The optimizer of ``phase`` (Adam, then SGD); with ``saved``, the state a resumed run left in this
    phase, it continues from there at the phase's learning rate."""
    optimizer = make_optimizer(model.parameters(), phase, cfg.lr_of(phase), cfg.weight_decay)
    if saved is not None:
        optimizer.load_state_dict(saved)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_of(phase)
    return optimizer


def _validation_top1(model: RegionalEnsemble, data: PreparedData, val_idx: list[int]) -> dict:
    """An epoch's held-out identity top-1: the aggregate's (``val_top1``) and each region's (``val_top1_<region>``)."""
    val = evaluate(model, data.crops[val_idx], data.labels[val_idx], ks=(1,))
    return {"val_top1": val["aggregate"]["top1"], **{f"val_top1_{r}": v["top1"] for r, v in val["regions"].items()}}


def _final_metrics(model: RegionalEnsemble, data: PreparedData, train_idx: list[int], val_idx: list[int],
                   identities: int, history: list[dict], start: int) -> dict:
    """The run's metrics: the history, where it resumed, the training set, and the held-out top-k."""
    metrics = {"history": history, "resumed_from": start, "train": {"n": len(train_idx), "identities": identities}}
    if val_idx:
        metrics["validation"] = evaluate(model, data.crops[val_idx], data.labels[val_idx])
    return metrics


def _state(model: RegionalEnsemble, class_names: list[str], cfg: PretrainConfig, fingerprint: dict, epoch: int,
           phase: str, optimizer: torch.optim.Optimizer, generator: torch.Generator, metrics: dict,
           holdout: list[str]) -> dict:
    """A checkpoint that :func:`shared.ml.train.checkpoint.load_checkpoint` reads, plus what resuming needs."""
    return {
        "format": CASIA_FORMAT,
        "kind": CHECKPOINT_KIND,
        "arch": model.arch,
        "config": model.config,
        "class_names": list(class_names),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metrics": metrics,
        "extra": {"pretrain": asdict(cfg), "holdout_images": holdout},
        "epoch": epoch,
        "phase": phase,
        "optimizer": optimizer.state_dict(),
        "rng": torch.get_rng_state(),
        "generator": generator.get_state(),
        "fingerprint": fingerprint,
    }


def summary_rows(metrics: dict) -> list[tuple[str, float]]:
    """(region, held-out identity top-1) rows, the aggregate last."""
    val = metrics.get("validation")
    if not val:
        return []
    return [*((r, v["top1"]) for r, v in val["regions"].items()), ("aggregate", val["aggregate"]["top1"])]


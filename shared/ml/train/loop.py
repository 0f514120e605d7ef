"""The training loop of the regional ensemble: one epoch, validation, fine-tuning from a pretrained
checkpoint, and resumable training that keeps the best epoch and may stop early.

The recipe (:class:`TrainConfig`, presets, optimizers, augmentation) lives in :mod:`shared.ml.train.recipe`, the
training data (:func:`prepare`, :class:`PreparedData`) in :mod:`shared.ml.train.prepared`, the training
modes and label maps in :mod:`shared.ml.train.modes`; callers import them from there.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from shared.ml.evaluate.statistics import topk_hits
from shared.ml.nets.ensemble import RegionalEnsemble, crops_to_tensor, predict_regions
from shared.ml.train.checkpoint import load_checkpoint, read_state, write_state
from shared.ml.train.prepared import PreparedData
from shared.ml.train.recipe import (
    FINETUNE_HEAD_GAIN,
    TrainConfig,
    augmentation,
    class_weights,
    make_optimizer,
    seed_everything,
)

logger = logging.getLogger(__name__)

ESTIMATE_AFTER = 5  # batches timed for the run-time estimate
# The kind of `gestalt train`'s epoch state file (shared.ml.train.checkpoint.write_state).
TRAIN_STATE = "gestalt-train-state"


def run_time_estimate(seconds: float, done: int, total: int, epochs: int, val_share: float = 0.0) -> float:
    """Seconds for ``epochs`` epochs of ``total`` batches, from ``done`` batches in ``seconds`` (validation:
    ``val_share`` of the training images, scored at about a third of a training step's cost per image)."""
    per_epoch = seconds / max(done, 1) * total * (1 + val_share / 3)
    return per_epoch * epochs


def _say_estimate(seconds: float, epochs: int) -> str:
    minutes = seconds / 60
    when = f"about {minutes:.0f} min" if minutes >= 1.5 else f"about {max(seconds, 1):.0f} s"
    return f"{when} for {epochs} epoch{'s' if epochs != 1 else ''} (estimated from the first batches)"


def train_epoch(model: RegionalEnsemble, x_train: torch.Tensor, y_train: torch.Tensor, loss_fn: nn.Module,
                optimizer: torch.optim.Optimizer, batch_size: int, generator: torch.Generator,
                aug: v2.Transform | None, device: torch.device, progress: bool = False, desc: str = "batch",
                on_first_batches=None) -> float:
    """One pass over uint8 crops ``N x R x H x W``; each region net learns from its own crop of each face.

    ``on_first_batches(seconds, batches_timed, batches_total)`` is called once, after
    :data:`ESTIMATE_AFTER` batches following the first (or at the end, when there are fewer), for a
    run-time estimate.

    Returns:
        The mean loss per region.
    """
    model.train()
    order = torch.randperm(len(x_train), generator=generator)
    total, seen = 0.0, 0
    n_regions = x_train.shape[1]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    # The first batch is left out of the estimate: it pays for warming up (allocations, thread pools).
    started = first = time.perf_counter()
    for done, idx in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress), 1):
        if done == 2:
            started = time.perf_counter()
        if on_first_batches is not None and done - 2 == ESTIMATE_AFTER:
            on_first_batches(time.perf_counter() - started, ESTIMATE_AFTER, len(batches))
            on_first_batches = None
        if len(idx) < 2:
            continue  # batch norm needs two samples
        # One random transform per face, shared by its regions (they come from one aligned canvas).
        xb = torch.stack([aug(x_train[i]) for i in idx.tolist()]) if aug is not None else x_train[idx]
        x = crops_to_tensor(xb).to(device)
        y = y_train[idx].to(device)
        logits = model(x)
        loss = sum(loss_fn(logits[:, r], y) for r in range(n_regions))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    if on_first_batches is not None and batches:
        timed = len(batches) - 1 if len(batches) > 1 else 1
        on_first_batches(time.perf_counter() - (started if len(batches) > 1 else first), timed, len(batches))
    return total / max(seen, 1) / n_regions


def binary_summary(aggregate: np.ndarray, labels: np.ndarray, positive: int) -> dict:
    """Sensitivity and specificity of a one-against-others model (argmax decides)."""
    pred = aggregate.argmax(axis=1) == positive
    truth = labels == positive
    return {"positive_index": int(positive), "n_positive": int(truth.sum()), "n_negative": int((~truth).sum()),
            "sensitivity": float(pred[truth].mean()) if truth.any() else float("nan"),
            "specificity": float((~pred[~truth]).mean()) if (~truth).any() else float("nan")}


def evaluate(model: RegionalEnsemble, crops: np.ndarray, labels: np.ndarray, ks: tuple[int, ...] = (1, 5, 10),
             positive: int | None = None) -> dict:
    """Top-k of each region's network and of their mean (the paper's Table 2 layout), as training validates."""
    model.eval()
    pred = predict_regions(model, crops)
    return prediction_metrics(model.regions, pred.region_probs, pred.aggregate, labels, ks, positive)


def prediction_metrics(names, member_probs: np.ndarray, aggregate: np.ndarray, labels: np.ndarray,
                       ks: tuple[int, ...] = (1, 5, 10), positive: int | None = None) -> dict:
    """Top-k of each member (``regions``, the paper's Table 2 layout; the identity member among them) and of the
    aggregate.

    Args:
        positive: for a binary model, the positive class; adds sensitivity and specificity.
    """
    out: dict = {"n": int(len(labels)), "aggregate": {}, "regions": {}}
    for k in ks:
        out["aggregate"][f"top{k}"] = float(topk_hits(aggregate, labels, k).mean())
    for i, r in enumerate(names):
        out["regions"][r] = {f"top{k}": float(topk_hits(member_probs[:, i], labels, k).mean()) for k in ks}
    if positive is not None:
        out["binary"] = binary_summary(aggregate, labels, positive)
    return out


def load_pretrained(data: bytes, num_classes: int, regions: tuple[str, ...] | None = None,
                    gain: float = FINETUNE_HEAD_GAIN, transfer_pairs: int | None = None) -> RegionalEnsemble:
    """An ensemble for fine-tuning: the region nets of a pretrained checkpoint with new final layers.

    Args:
        data: a checkpoint (``gestalt pretrain`` output, or any trained model).
        num_classes: outputs of the new final layers.
        regions: the regions to keep, each in the checkpoint (default: all of the checkpoint's).
        gain: Xavier-normal gain of the new final layers (the paper's 0.3).
        transfer_pairs: how many of each net's conv pairs keep their pretrained weights; the
            later ones start afresh (He-normal). None keeps all of them, as the paper does
            after pretraining on 10,000 identities. After pretraining on a few dozen, the
            later pairs only know those people, and keeping fewer transfers better
            (README, "Pretraining and fine-tuning").

    Raises:
        ValueError: when the checkpoint lacks one of ``regions``, or ``transfer_pairs`` is out of range.
    """
    loaded, _ = load_checkpoint(data)
    casia = loaded.member("casia")
    if casia is None:
        raise ValueError("the checkpoint has no CASIA-Nets to fine-tune (it was trained with --backbone encoder)")
    pretrained = casia.net
    regions = tuple(regions) if regions is not None else pretrained.regions
    missing = [r for r in regions if r not in pretrained.regions]
    if missing:
        raise ValueError(f"the pretrained checkpoint has no net for region(s) {', '.join(missing)} "
                         f"(it has {', '.join(pretrained.regions)})")
    model = RegionalEnsemble(tuple(regions), num_classes, arch=pretrained.arch, width=pretrained.width)
    for r in regions:
        net = pretrained.nets[r]
        if transfer_pairs is not None:
            net.reinit_pairs_from(transfer_pairs)
        net.reset_classifier(num_classes, gain=gain)
        model.nets[r] = net
    return model.train()


def _resume_fingerprint(class_names, regions, train_idx, val_idx, cfg: TrainConfig, init) -> dict:
    """What a resumed run must share with the run that wrote the epoch state."""
    return {"class_names": list(class_names), "regions": list(regions), "train_idx": [int(i) for i in train_idx],
            "val_idx": [int(i) for i in val_idx], "fine_tuned": init is not None,
            **{k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("device", "progress", "patience")}}


def train_ensemble(data: PreparedData, class_names: list[str], regions: tuple[str, ...], train_idx: list[int],
                   val_idx: list[int], cfg: TrainConfig, init: RegionalEnsemble | None = None,
                   positive: int | None = None, state_path=None) -> tuple[RegionalEnsemble, dict]:
    """Train one CASIA-Net per region on the same faces; keep the epoch with the best validation top-k.

    Args:
        init: fine-tune this ensemble (its heads must already have ``len(class_names)`` outputs, see
            :func:`load_pretrained`) instead of training a new one from scratch.
        positive: for a binary model, the positive class (validation then reports sensitivity and specificity).
        state_path: rewritten after every epoch (through a temp file) with the weights, the optimizer,
            scheduler and random state and the best epoch so far; when it exists, training resumes
            after its last epoch (the data, split and recipe must be the same).

    Early stopping (``cfg.patience``) ends training after that many epochs without a better
    validation score; the best epoch's weights are kept either way.

    Raises:
        ValueError: when ``state_path`` was written by a different run.

    Returns:
        The trained ensemble (CPU, eval mode) and its metrics.
    """
    seed_everything(cfg.seed)
    run = _TrainingRun(data, class_names, regions, train_idx, val_idx, cfg, init)
    started = time.perf_counter()
    if state_path is not None:
        run.resume(state_path)
    progress = run.progress
    for epoch in tqdm(range(progress.start, cfg.epochs), desc="train", unit="epoch", initial=progress.start,
                      total=cfg.epochs, disable=not cfg.progress or progress.stopped_early):
        if progress.stopped_early:
            break
        run.run_epoch(epoch)
        if state_path is not None:
            run.save(state_path, epoch + 1)
        if progress.stopped_early:
            logger.info("train early stop epoch=%d patience=%d", epoch + 1, cfg.patience)
            break
    model = run.best_model()
    return model, run.metrics(model, started, positive)


@dataclass
class _Progress:
    """How far a run has come: what the epoch state file keeps besides the weights and the random state."""

    start: int = 0  # the epoch this call started at (after resuming, the state file's)
    history: list[dict] = field(default_factory=list)
    best: tuple | None = None  # the best validation score so far (see _TrainingRun.validate)
    best_state: dict | None = None  # the weights of the best epoch
    since_best: int = 0
    stopped_early: bool = False

    def record(self, entry: dict, score: tuple, model: RegionalEnsemble, patience: int) -> None:
        """Keep the weights when ``score`` is the best so far; count epochs without a better one."""
        # Patience counts epochs since validation top-k last rose (the training loss breaks ties only).
        improved = self.best is None or score[:-1] > tuple(self.best[:-1])
        if self.best is None or score >= self.best:
            self.best = score
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            entry["best"] = True
        self.since_best = 0 if improved else self.since_best + 1
        if patience and self.since_best >= patience:
            self.stopped_early = True
            entry["stopped_early"] = True


class _TrainingRun:
    """One call of :func:`train_ensemble`: the model and what trains it (data, loss, optimizer, schedule,
    augmentation, random generator), the validation setup and the :class:`_Progress` so far."""

    def __init__(self, data: PreparedData, class_names: list[str], regions: tuple[str, ...], train_idx: list[int],
                 val_idx: list[int], cfg: TrainConfig, init: RegionalEnsemble | None):
        self.device = device = torch.device(cfg.device)
        self.model = (copy.deepcopy(init) if init is not None
                      else RegionalEnsemble(regions, len(class_names), width=cfg.width)).to(device)
        if init is not None and init.num_classes != len(class_names):
            raise ValueError(f"the initial model has {init.num_classes} outputs, the data {len(class_names)} classes")
        self.data, self.train_idx, self.val_idx, self.cfg = data, train_idx, val_idx, cfg
        self.fine_tuned = init is not None
        self.x_train = torch.as_tensor(data.crops[train_idx])
        self.y_train = torch.as_tensor(data.labels[train_idx])
        self.loss_fn = nn.CrossEntropyLoss(weight=class_weights(data.labels[train_idx], len(class_names)).to(device))
        self.optimizer = make_optimizer(self.model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=max(1, cfg.epochs))
        self.aug = augmentation() if cfg.augment else None
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.select_topk = cfg.select_topk if cfg.select_topk < len(class_names) else 1
        self.ks = tuple(k for k in sorted({1, 5, self.select_topk}) if k == 1 or k < len(class_names))
        self.fingerprint = _resume_fingerprint(class_names, regions, train_idx, val_idx, cfg, init)
        self.progress = _Progress()
        self.timing: dict = {}

    def resume(self, state_path) -> None:
        """Continue from the epoch state at ``state_path``, if there is one."""
        state = read_state(state_path, TRAIN_STATE, "a training state file of `gestalt train`")
        if state is None:
            return
        if state["fingerprint"] != self.fingerprint:
            raise ValueError(f"{state_path} was written by a run with other data, split or settings; "
                             "remove it or choose another file")
        self.model.load_state_dict(state["state_dict"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["rng"])
        self.progress = _Progress(
            start=int(state["epoch"]), history=list(state["history"]),
            best=tuple(state["best"]) if state["best"] is not None else None, best_state=state["best_state"],
            since_best=int(state["since_best"]), stopped_early=bool(state["stopped_early"]))
        logger.info("train resume epoch=%d path=%s", self.progress.start, state_path)

    def run_epoch(self, epoch: int) -> None:
        """Train 0-based ``epoch``, then validate it; its entry joins the history."""
        cfg = self.cfg
        loss = train_epoch(self.model, self.x_train, self.y_train, self.loss_fn, self.optimizer, cfg.batch_size,
                           self.generator, self.aug, self.device, progress=cfg.progress,
                           desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           on_first_batches=self._estimator(cfg.epochs - epoch) if epoch == self.progress.start
                           else None)
        self.scheduler.step()
        entry = {"epoch": epoch + 1, "loss": loss}
        if self.val_idx:
            self.progress.record(entry, self.validate(entry), self.model, cfg.patience)
        self.progress.history.append(entry)
        logger.info("train epoch=%d %s", epoch + 1, " ".join(f"{k}={v:.4f}" for k, v in entry.items()
                                                             if isinstance(v, float)))

    def _estimator(self, left: int):
        """The first epoch's ``on_first_batches``: estimates the run time of the ``left`` epochs, says it
        (with progress on) and logs it."""
        val_share = len(self.val_idx) / max(len(self.train_idx), 1)

        def estimate(seconds: float, done: int, total: int) -> None:
            eta = run_time_estimate(seconds, done, total, left, val_share)
            self.timing["estimated_seconds"] = round(eta, 1)
            if self.cfg.progress:
                tqdm.write(_say_estimate(eta, left))
            logger.info("train estimate seconds=%.0f epochs=%d", eta, left)

        return estimate

    def validate(self, entry: dict) -> tuple:
        """Validation top-k into ``entry``; returns the epoch's score: top-k at ``select_topk``, then every
        top-k from the lowest k, then the negative training loss (higher is better throughout)."""
        metrics = evaluate(self.model, self.data.crops[self.val_idx], self.data.labels[self.val_idx], ks=self.ks)
        entry.update({f"val_top{k}": metrics["aggregate"][f"top{k}"] for k in self.ks})
        return (entry[f"val_top{self.select_topk}"], *(entry[f"val_top{k}"] for k in self.ks), -entry["loss"])

    def save(self, state_path, epoch: int) -> None:
        """Rewrite the epoch state file after ``epoch`` epochs (what :meth:`resume` reads)."""
        p = self.progress
        write_state(state_path, {
            "kind": TRAIN_STATE, "fingerprint": self.fingerprint, "epoch": epoch, "history": p.history,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "generator": self.generator.get_state(), "rng": torch.get_rng_state(),
            "best": list(p.best) if p.best is not None else None, "best_state": p.best_state,
            "since_best": p.since_best, "stopped_early": p.stopped_early})

    def best_model(self) -> RegionalEnsemble:
        """The model with the best epoch's weights (the last epoch's without validation), on CPU, in eval mode."""
        if self.progress.best_state is not None:
            self.model.load_state_dict(self.progress.best_state)
        return self.model.cpu().eval()

    def metrics(self, model: RegionalEnsemble, started: float, positive: int | None) -> dict:
        """The run's metrics: training set, history, best epoch, timing, recipe, and the final validation."""
        cfg, p, data = self.cfg, self.progress, self.data
        metrics = {
            "train": {"n": len(self.train_idx), "subjects": len({data.samples[i].subject for i in self.train_idx})},
            "history": p.history,
            "best_epoch": next((e["epoch"] for e in reversed(p.history) if e.get("best")), None),
            "stopped_early": p.stopped_early, "resumed_from": p.start,
            "timing": {**self.timing, "train_seconds": round(time.perf_counter() - started, 1)},
            "config": {"width": model.width, "epochs": cfg.epochs, "patience": cfg.patience,
                       "batch_size": cfg.batch_size, "lr": cfg.lr,
                       "weight_decay": cfg.weight_decay if cfg.optimizer == "adam" else 0.0, "seed": cfg.seed,
                       "optimizer": cfg.optimizer, "select_topk": cfg.select_topk, "fine_tuned": self.fine_tuned},
        }
        if self.val_idx:
            metrics["validation"] = evaluate(model, data.crops[self.val_idx], data.labels[self.val_idx],
                                             positive=positive)
            metrics["validation"]["subjects"] = len({data.samples[i].subject for i in self.val_idx})
        return metrics

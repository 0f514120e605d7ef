"""Training data, subject-disjoint splits and the training loop of the regional ensemble."""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import random
import time
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from torch import nn
from torchvision.transforms import v2
from tqdm import tqdm

from shared.ml.data import Sample
from shared.ml.evaluation import topk_hits
from shared.ml.gestalt import RegionalEnsemble, crops_to_tensor, load_checkpoint, predict
from shared.ml.imaging import ImageRejected, decode_upload
from shared.ml.prepcache import CachedFace, CachedRejection, PrepCache
from shared.ml.preprocess import Preprocessor

logger = logging.getLogger(__name__)

@dataclass
class PreparedData:
    crops: np.ndarray  # N x R x 100 x 100 uint8
    labels: np.ndarray  # N int64
    samples: list[Sample]
    rejected: list[tuple[Sample, str]] = field(default_factory=list)
    aligned: np.ndarray | None = None  # N x 200 x 200 uint8 aligned grayscale faces (keep_aligned=True)
    landmarks: np.ndarray | None = None  # N x L x 2 landmarks on the aligned canvas (keep_aligned=True)
    chips: np.ndarray | None = None  # N x 150 x 150 x 3 uint8 face chips, the identity encoder's input
    descriptors: np.ndarray | None = None  # N x 128 identity descriptors of the chips (describe_faces)


def prepare(samples: list[Sample], class_names: list[str], preprocessor: Preprocessor,
            max_bytes: int = 50 * 2**20, max_pixels: float = 4e7, progress: bool = True,
            keep_aligned: bool = False, cache: PrepCache | None = None) -> PreparedData:
    """Decode, detect, align and crop every sample, as the worker does for an upload.

    With ``cache``, a photo preprocessed before with the same setup (backends, regions, threshold) is
    read from it instead: neither decoding nor the detector runs. Faces found and photos rejected by
    the preprocessor are both cached; photos the decoder refuses are not (cheap, and limit-dependent).

    Raises:
        ValueError: when a sample's label is not in ``class_names`` (all unknown labels are listed).
    """
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({s.label for s in samples} - set(index))
    if unknown:
        raise ValueError(f"{len(unknown)} unknown label(s): {', '.join(unknown[:20])}")
    crops, labels, kept, rejected, aligned, landmarks, chips = [], [], [], [], [], [], []
    for s in tqdm(samples, desc="preprocess", unit="img", disable=not progress):
        raw = s.path.read_bytes()
        entry = None
        if cache is not None:
            digest = hashlib.sha256(raw).hexdigest()
            entry = cache.get(digest)
        if entry is None:
            try:
                decoded = decode_upload(raw, max_bytes=max_bytes, max_pixels=max_pixels, min_side=32)
            except ImageRejected as exc:
                rejected.append((s, exc.reason))
                continue
            try:
                result = preprocessor.run(decoded.rgb)
            except ImageRejected as exc:
                entry = CachedRejection(exc.reason)
            else:
                entry = CachedFace(np.stack([result.aligned.crops[r] for r in preprocessor.regions]),
                                   cv2.cvtColor(result.aligned.aligned_rgb, cv2.COLOR_RGB2GRAY),
                                   result.aligned.alignment.apply(result.aligned.landmarks).astype(np.float32),
                                   result.aligned.chip)
            if cache is not None:
                cache.put(digest, entry)
        if isinstance(entry, CachedRejection):
            rejected.append((s, entry.reason))
            continue
        crops.append(entry.crops)
        chips.append(entry.chip)
        labels.append(index[s.label])
        kept.append(s)
        if keep_aligned:
            aligned.append(entry.aligned)
            landmarks.append(entry.landmarks)
    if cache is not None:
        logger.info("preprocessing cache %s: %d read, %d computed", cache.root, cache.hits, cache.misses)
    if not crops:
        raise ValueError("no usable face in the data")
    return PreparedData(np.stack(crops), np.asarray(labels, np.int64), kept, rejected,
                        np.stack(aligned) if keep_aligned else None, np.stack(landmarks) if keep_aligned else None,
                        np.stack(chips))


# The paper's fine-tuning recipe: a new final layer, Xavier-normal at this gain, trained with SGD.
FINETUNE_HEAD_GAIN = 0.3
FINETUNE_LR = 5e-3
SCRATCH_LR = 1e-3
MOMENTUM = 0.9
# Binary mode: every label but the positive one becomes this class.
BINARY_NEGATIVE = "others"
MODES = ("multiclass", "binary", "specialised")


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


ESTIMATE_AFTER = 5  # batches timed for the run-time estimate


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
    """Top-k of each region and of the aggregate (the paper's Table 2 layout).

    Args:
        positive: for a binary model, the positive class; adds sensitivity and specificity.
    """
    model.eval()
    pred = predict(model, crops)
    out: dict = {"n": int(len(labels)), "aggregate": {}, "regions": {}}
    for k in ks:
        out["aggregate"][f"top{k}"] = float(topk_hits(pred.aggregate, labels, k).mean())
    for i, r in enumerate(model.regions):
        out["regions"][r] = {f"top{k}": float(topk_hits(pred.region_probs[:, i], labels, k).mean()) for k in ks}
    if positive is not None:
        out["binary"] = binary_summary(pred.aggregate, labels, positive)
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
    pretrained, _ = load_checkpoint(data)
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
    device = torch.device(cfg.device)
    model = (copy.deepcopy(init) if init is not None
             else RegionalEnsemble(regions, len(class_names), width=cfg.width)).to(device)
    if init is not None and init.num_classes != len(class_names):
        raise ValueError(f"the initial model has {init.num_classes} outputs, the data {len(class_names)} classes")
    x_train = torch.as_tensor(data.crops[train_idx])
    y_train = torch.as_tensor(data.labels[train_idx])
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(data.labels[train_idx], len(class_names)).to(device))
    optimizer = make_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, cfg.epochs))
    aug = augmentation() if cfg.augment else None
    generator = torch.Generator().manual_seed(cfg.seed)
    select_topk = cfg.select_topk if cfg.select_topk < len(class_names) else 1
    ks = tuple(k for k in sorted({1, 5, select_topk}) if k == 1 or k < len(class_names))
    history, best, best_state, start, since_best, stopped_early = [], None, None, 0, 0, False
    timing: dict = {}
    started = time.perf_counter()
    fingerprint = _resume_fingerprint(class_names, regions, train_idx, val_idx, cfg, init)
    if state_path is not None:
        state = _load_train_state(state_path)
        if state is not None:
            if state["fingerprint"] != fingerprint:
                raise ValueError(f"{state_path} was written by a run with other data, split or settings; "
                                 "remove it or choose another file")
            model.load_state_dict(state["state_dict"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            generator.set_state(state["generator"])
            torch.set_rng_state(state["rng"])
            start, history, since_best = int(state["epoch"]), list(state["history"]), int(state["since_best"])
            best = tuple(state["best"]) if state["best"] is not None else None
            best_state, stopped_early = state["best_state"], bool(state["stopped_early"])
            logger.info("train resume epoch=%d path=%s", start, state_path)
    for epoch in tqdm(range(start, cfg.epochs), desc="train", unit="epoch", initial=start, total=cfg.epochs,
                      disable=not cfg.progress or stopped_early):
        if stopped_early:
            break
        def estimate(seconds: float, done: int, total: int, left: int = cfg.epochs - epoch) -> None:
            eta = run_time_estimate(seconds, done, total, left, len(val_idx) / max(len(train_idx), 1))
            timing["estimated_seconds"] = round(eta, 1)
            if cfg.progress:
                tqdm.write(_say_estimate(eta, left))
            logger.info("train estimate seconds=%.0f epochs=%d", eta, left)

        loss = train_epoch(model, x_train, y_train, loss_fn, optimizer, cfg.batch_size, generator, aug, device,
                           progress=cfg.progress, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                           on_first_batches=estimate if epoch == start else None)
        scheduler.step()
        entry = {"epoch": epoch + 1, "loss": loss}
        if val_idx:
            metrics = evaluate(model, data.crops[val_idx], data.labels[val_idx], ks=ks)
            entry.update({f"val_top{k}": metrics["aggregate"][f"top{k}"] for k in ks})
            score = (entry[f"val_top{select_topk}"], *(entry[f"val_top{k}"] for k in ks), -entry["loss"])
            # Patience counts epochs since validation top-k last rose (the training loss breaks ties only).
            improved = best is None or score[:-1] > tuple(best[:-1])
            if best is None or score >= best:
                best = score
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                entry["best"] = True
            since_best = 0 if improved else since_best + 1
            if cfg.patience and since_best >= cfg.patience:
                stopped_early = True
                entry["stopped_early"] = True
        history.append(entry)
        logger.info("train epoch=%d %s", epoch + 1, " ".join(f"{k}={v:.4f}" for k, v in entry.items()
                                                             if isinstance(v, float)))
        if state_path is not None:
            from shared.ml.pretrain import save_state

            save_state(state_path, {
                "kind": "gestalt-train-state", "fingerprint": fingerprint, "epoch": epoch + 1, "history": history,
                "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "generator": generator.get_state(), "rng": torch.get_rng_state(),
                "best": list(best) if best is not None else None, "best_state": best_state,
                "since_best": since_best, "stopped_early": stopped_early})
        if stopped_early:
            logger.info("train early stop epoch=%d patience=%d", epoch + 1, cfg.patience)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    model = model.cpu().eval()
    metrics = {
        "train": {"n": len(train_idx), "subjects": len({data.samples[i].subject for i in train_idx})},
        "history": history,
        "best_epoch": next((e["epoch"] for e in reversed(history) if e.get("best")), None),
        "stopped_early": stopped_early, "resumed_from": start,
        "timing": {**timing, "train_seconds": round(time.perf_counter() - started, 1)},
        "config": {"width": model.width, "epochs": cfg.epochs, "patience": cfg.patience, "batch_size": cfg.batch_size,
                   "lr": cfg.lr,
                   "weight_decay": cfg.weight_decay if cfg.optimizer == "adam" else 0.0, "seed": cfg.seed,
                   "optimizer": cfg.optimizer, "select_topk": cfg.select_topk, "fine_tuned": init is not None},
    }
    if val_idx:
        metrics["validation"] = evaluate(model, data.crops[val_idx], data.labels[val_idx], positive=positive)
        metrics["validation"]["subjects"] = len({data.samples[i].subject for i in val_idx})
    return model, metrics


def _load_train_state(path) -> dict | None:
    from pathlib import Path

    if not Path(path).is_file():
        return None
    import io

    state = torch.load(io.BytesIO(Path(path).read_bytes()), map_location="cpu", weights_only=True)
    if state.get("kind") != "gestalt-train-state":
        raise ValueError(f"{path} is not a training state file of `gestalt train`; choose another file")
    return state


def select_task(samples: list[Sample], mode: str, positive: str | None = None,
                classes: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Samples and class names of a training mode.

    * ``multiclass``: every label is a class.
    * ``binary``: ``positive`` against all other labels (merged into ``others``).
    * ``specialised``: only the samples of ``classes`` (e.g. the genotypes of one syndrome).

    Raises:
        ValueError: for a missing or unknown positive label or class (all unknown ones are listed).
    """
    labels = sorted({s.label for s in samples})
    if mode == "multiclass":
        return samples, labels
    if mode == "binary":
        if not positive:
            raise ValueError("binary mode needs a positive label")
        if positive not in labels:
            raise ValueError(f"unknown positive label {positive!r}; the data has: {', '.join(labels[:20])}")
        if positive == BINARY_NEGATIVE:
            raise ValueError(f"the positive label cannot be {BINARY_NEGATIVE!r}")
        if len(labels) < 2:
            raise ValueError("binary mode needs at least one other label")
        return ([dataclasses.replace(s, label=s.label if s.label == positive else BINARY_NEGATIVE) for s in samples],
                [positive, BINARY_NEGATIVE])
    if mode == "specialised":
        wanted = sorted(set(classes or []))
        if len(wanted) < 2:
            raise ValueError("specialised mode needs at least two classes")
        unknown = [c for c in wanted if c not in labels]
        if unknown:
            raise ValueError(f"{len(unknown)} unknown class(es): {', '.join(unknown[:20])}")
        return [s for s in samples if s.label in wanted], wanted
    raise ValueError(f"unknown mode {mode!r} ({', '.join(MODES)})")


def data_hash(samples: list[Sample]) -> str:
    """A short fingerprint of the training set (paths, labels, subjects)."""
    h = hashlib.sha256()
    for s in samples:
        h.update(f"{s.label}\0{s.subject}\0{s.path.name}\n".encode())
    return h.hexdigest()[:16]


def binary_label_map(labels: list[str] | set[str], positive: str) -> dict[str, str]:
    """Binary mode's mapping of every original label onto ``positive`` or ``others``, stored with the model."""
    return {label: positive if label == positive else BINARY_NEGATIVE for label in sorted(labels)}


def apply_label_map(samples: list[Sample], class_names: list[str], extra: dict) -> tuple[list[Sample], dict[str, str]]:
    """Test samples with the labels the model was trained on: the mapping ``gestalt train`` applied.

    A binary model's checkpoint stores its ``label_map`` (e.g. ``healthy -> others``); a label it has
    not seen (or an older checkpoint without a map) goes to the negative class. Other models use their
    class names as they are (an unknown label is then an error in :func:`prepare`).

    Returns:
        The samples and the mapping applied (original label -> class name; only labels that changed).
    """
    mapping = dict(extra.get("label_map") or {})
    binary = extra.get("mode") == "binary" or (len(class_names) == 2 and class_names[1] == BINARY_NEGATIVE)
    negative = extra.get("negative") or (class_names[1] if binary else None)
    applied: dict[str, str] = {}
    out = []
    for s in samples:
        target = s.label
        if s.label not in class_names:
            if s.label in mapping:
                target = mapping[s.label]
            elif binary:
                target = negative
        if target != s.label:
            applied[s.label] = target
            s = dataclasses.replace(s, label=target)
        out.append(s)
    return out, applied


def reason_kind(reason: str) -> str:
    """A rejection reason without its figures and advice, for counting (``the face is too small in the photo``)."""
    return reason.split(" (", 1)[0].split(";", 1)[0].strip()


def skipped_summary(rejected: list[tuple[Sample, str]]) -> list[tuple[str, int]]:
    """(reason, count) of skipped photos, the most frequent first."""
    from collections import Counter

    return Counter(reason_kind(r) for _, r in rejected).most_common()


def write_skipped(rejected: list[tuple[Sample, str]], path) -> None:
    """Every skipped photo with its reason: a CSV of image, subject, label, reason."""
    import csv
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "subject", "label", "reason"])
        for sample, reason in rejected:
            w.writerow([str(sample.path), sample.subject, sample.label, reason])

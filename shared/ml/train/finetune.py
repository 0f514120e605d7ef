"""Fine-tuning the identity encoder per region, where held-out training photos say it pays.

The paper fine-tunes each region's network after face-identity pretraining. Here the pretrained network is the
identity encoder (dlib's ResNet, learned on millions of faces); each region's member may get its own copy of the
encoder's 256-channel stage (the residual blocks from :data:`TAIL_BLOCK` to the stage features the member reads),
fine-tuned on that region's cuts while the blocks before stay frozen and shared. The frozen blocks run once per
photo (their activations are kept), so a tail trains on 8 x 8 maps.

Whether a region is fine-tuned is decided on the training photos themselves, split by patient
(:data:`CHECK_FRACTION` held out): each region's tail is trained on the rest with early stopping on the held-out
patients, and a head fitted on the tuned descriptors must beat one fitted on the frozen descriptors there
(lower log-loss, no lower macro top-1). The learning rates are per depth (the tail's blocks gently, the new
classifier on top fast), and the choice with its figures is written into the model.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from shared.ml.members.identity import fit_identity_head
from shared.ml.members.stack import log_loss
from shared.ml.train.recipe import class_weights

logger = logging.getLogger(__name__)

# The first of the encoder's residual blocks a region's member may fine-tune: the start of its 256-channel stage
# (on the screening example, tuning from here lifted the upper and lower face's cross-collection calls, on the
# encoder's identity descriptor, from 0.87 and 0.77 to 0.97 and 0.94; tuning from block 12 did not help).
TAIL_BLOCK = 10
CHECK_FRACTION = 0.2
# The heads the frozen and the fine-tuned descriptors are compared with (one linear, one on an RBF map): the same
# for both, and a third of the cost of choosing among every candidate.
COMPARE_HEADS = (("linear", 0.0, 1.0), ("rbf", 1.0, 1.0))


@dataclass
class FinetuneConfig:
    epochs: int = 6
    batch_size: int = 32
    lr_tail: float = 1e-4  # the pretrained blocks move gently
    lr_classifier: float = 1e-2  # the new syndrome classifier on top learns fast
    weight_decay: float = 1e-4
    patience: int = 2  # epochs without a better held-out loss before stopping
    seed: int = 0
    progress: bool = False


def split_check(subjects: np.ndarray, index: np.ndarray, fraction: float = CHECK_FRACTION,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``index`` split by patient into (fit, check): about ``fraction`` of the patients held out."""
    subjects = np.asarray(subjects)
    patients = np.unique(subjects[index])
    rng = np.random.default_rng(seed)
    held = set(rng.choice(patients, size=max(1, int(round(len(patients) * fraction))), replace=False).tolist()) \
        if len(patients) >= 5 else set()
    check = np.array([i for i in index if subjects[i] in held], int)
    fit = np.array([i for i in index if subjects[i] not in held], int)
    return fit, check


def tune_tail(encoder, acts: np.ndarray, labels: np.ndarray, n_classes: int, cfg: FinetuneConfig,
              check_acts: np.ndarray | None = None, check_labels: np.ndarray | None = None,
              block: int = TAIL_BLOCK, desc: str = "tail") -> tuple[nn.Module, list[dict]]:
    """A copy of the encoder's blocks from ``block`` to its stage features, fine-tuned with a new linear classifier on
    activations
    ``N x V x C x H x W`` (one of the ``V`` views, a crop or its mirror, drawn per step), class-weighted; the epoch
    with the lowest held-out loss is kept when ``check_acts`` are given. Returns the tail and the epochs' losses."""
    from shared.ml.nets.encoder import FEATURE_DIM
    from shared.ml.nets.encoder_runner import EncoderTail

    torch.manual_seed(cfg.seed)
    tail = EncoderTail(encoder, block).train()
    classifier = nn.Linear(FEATURE_DIM, n_classes)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights(labels, n_classes))
    optimizer = torch.optim.AdamW([{"params": tail.parameters(), "lr": cfg.lr_tail},
                                   {"params": classifier.parameters(), "lr": cfg.lr_classifier}],
                                  weight_decay=cfg.weight_decay)
    x, y = torch.as_tensor(acts), torch.as_tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    best, best_state, since = np.inf, copy.deepcopy(tail.state_dict()), 0
    for epoch in tqdm(range(cfg.epochs), desc=desc, unit="epoch", leave=False, disable=not cfg.progress):
        tail.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            if len(idx) < 2:
                continue
            view = torch.randint(0, x.shape[1], (len(idx),), generator=generator)
            loss = loss_fn(classifier(tail(x[idx, view])), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        entry = {"epoch": epoch + 1, "loss": total / max(len(x), 1)}
        if check_acts is not None and len(check_acts):
            with torch.no_grad():
                tail.eval()
                logits = classifier(torch.as_tensor(tail.describe(check_acts)))
                entry["check_loss"] = float(loss_fn(logits, torch.as_tensor(check_labels, dtype=torch.long)))
            if entry["check_loss"] < best - 1e-4:
                best, best_state, since = entry["check_loss"], copy.deepcopy(tail.state_dict()), 0
            else:
                since += 1
        history.append(entry)
        if check_acts is not None and since >= cfg.patience:
            break
    if check_acts is not None and len(check_acts):
        tail.load_state_dict(best_state)
    return tail.eval(), history


def choose_tails(encoder, cuts: dict[str, np.ndarray], frozen: dict[str, np.ndarray], labels: np.ndarray,
                 subjects, train_idx, n_classes: int, cfg: FinetuneConfig | None = None,
                 block: int = TAIL_BLOCK) -> tuple[dict, dict[str, np.ndarray], dict, tuple[np.ndarray, np.ndarray]]:
    """For each region (``cuts``: region -> every photo's ``N x 150 x 150 x 3`` cuts; ``frozen``: the frozen
    encoder's stage features), train a tail on the training photos' fit part and keep it where its held-out
    patients say it pays.

    Returns the chosen tails, the descriptors every photo gets from each region's chosen variant, the choice with
    its figures per region, and the (fit, check) split of ``train_idx``.
    """
    from shared.ml.nets.encoder_runner import run_encoder

    cfg = cfg or FinetuneConfig()
    y = np.asarray(labels)
    fit, check = split_check(subjects, np.asarray(train_idx, int), seed=cfg.seed)
    tails, chosen, report = {}, dict(frozen), {"block": block, "config": asdict(cfg), "fit": len(fit),
                                                "check": len(check), "regions": {}}
    if len(check) == 0 or len(np.unique(y[fit])) < 2:
        report["skipped"] = "too few patients to hold some out for the choice"
        return tails, chosen, report, (fit, check)
    for region, region_cuts in cuts.items():
        acts = run_encoder(encoder, region_cuts, flip=True, block=block).activations
        tail, history = tune_tail(encoder, acts[fit], y[fit], n_classes, cfg, acts[check], y[check], block, region)
        tuned = tail.describe(acts)
        figures = {}
        for variant, desc in (("frozen", frozen[region]), ("tuned", tuned)):
            head = fit_identity_head(desc[fit], y[fit], n_classes, np.asarray(subjects)[fit], cfg.seed, COMPARE_HEADS)
            probs = head.probs(desc[check])
            hit = probs.argmax(1) == y[check]
            figures[variant] = {"log_loss": round(log_loss(probs, y[check]), 4),
                                "macro_top1": round(float(np.mean([hit[y[check] == c].mean()
                                                                   for c in np.unique(y[check])])), 4)}
        keep = (figures["tuned"]["log_loss"] < figures["frozen"]["log_loss"]
                and figures["tuned"]["macro_top1"] >= figures["frozen"]["macro_top1"])
        report["regions"][region] = {**figures, "fine_tuned": keep, "epochs": history}
        if keep:
            tails[region], chosen[region] = tail, tuned
        logger.info("finetune region=%s tuned=%s frozen=%s kept=%s", region, figures["tuned"], figures["frozen"], keep)
    return tails, chosen, report, (fit, check)

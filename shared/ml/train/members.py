"""Fitting a model's members on prepared photos, and every member's scores side by side.

Two backbones (``gestalt train --backbone``):

* ``encoder`` (the default): every member is built on the identity encoder, dlib's ResNet learned on millions
  of faces. The identity member reads dlib's face chip; the regional members read each of the paper's regions cut
  from the aligned face at the encoder's size (:class:`~shared.ml.members.encoder_regions.EncoderRegions`). The
  encoder stays frozen; each member's head (its kind chosen on subject-grouped folds) learns the syndromes, and
  the members' out-of-fold scores on those folds fit the stack (:mod:`shared.ml.members.stack`).
* ``casia``: the paper's regional CASIA-Nets, trained on the photos (:mod:`shared.ml.train.loop`), and the
  identity member beside them. The networks' scores on their own training photos are not held out, so the stack
  is fitted on the validation split instead.

Either way the validation split, which no member or stack was fitted on, reports each member and the aggregate
(:func:`member_report`), and chooses the descriptors the gallery and the out-of-distribution score use.
"""
from __future__ import annotations

import logging

import numpy as np

from shared.ml.members.identity import MEMBER, IdentityMember, fit_identity_head
from shared.ml.members.model import CASIA, GestaltModel, Prediction, crop_of, predict
from shared.ml.members.stack import Stack, fit_stack
from shared.ml.nets.ensemble import RegionalEnsemble
from shared.ml.preprocess.regions import DEFAULT_REGIONS
from shared.ml.train.finetune import TAIL_BLOCK, FinetuneConfig, choose_tails
from shared.ml.train.prepared import PreparedData
from shared.ml.train.refit import FLIP_DESCRIPTORS, choose_descriptor_space, fit_encoder_heads

logger = logging.getLogger(__name__)

def encoder_fn(device: str = "cpu", precision: str = "auto"):
    """The identity encoder, loaded, as members and saliency take it (an
    :class:`~shared.ml.nets.encoder.EncoderRunner`)."""
    from shared.ml.nets.encoder import load_encoder
    from shared.ml.nets.encoder_runner import EncoderRunner

    return EncoderRunner(load_encoder(device), precision)


def describe(data: PreparedData, names: tuple[str, ...], encode,
             flip: bool = FLIP_DESCRIPTORS) -> dict[str, np.ndarray]:
    """What the encoder gives of every face of ``data`` for ``names``: the face chip's identity descriptor for
    "identity", a region's cut's stage features for a region; computed once (one pass over every crop still
    missing) and kept on ``data``."""
    from shared.ml.members.base import Passes

    missing = [n for n in names if n not in data.descriptors]
    if missing:
        passes = Passes(data.stored_crops(), encode)
        passes.prepare([(crop_of(n), flip) for n in missing])
        for n in missing:
            data.descriptors[n] = passes.descriptors(crop_of(n), flip) if n == MEMBER else \
                passes.features(crop_of(n), flip)
    return {n: data.descriptors[n] for n in names}


def fit_encoder_model(data: PreparedData, class_names: list[str], train_idx, val_idx, encode, encoder_sha: str,
                      regions: tuple[str, ...] | None = None, seed: int = 0,
                      finetune: FinetuneConfig | None = None) -> tuple[GestaltModel, dict]:
    """A model of encoder members (the regions' and the identity member) fitted on ``train_idx``, with each region
    fine-tuned where held-out training photos say it pays (``finetune``; None keeps the encoder frozen), and their
    stack (:func:`shared.ml.train.refit.fit_encoder_heads`). Returns the model, the heads chosen and the
    fine-tuning's choice with its figures."""
    regions = tuple(regions or DEFAULT_REGIONS)
    frozen = describe(data, (*regions, MEMBER), encode)
    subjects = [s.subject for s in data.samples]
    desc, tails, check, report = dict(frozen), {}, None, None
    if finetune is not None:
        cuts = {r: data.cuts[:, DEFAULT_REGIONS.index(r)] for r in regions}
        tails, chosen, report, (_, check) = choose_tails(encode.net, cuts, frozen, data.labels, subjects, train_idx,
                                                         len(class_names), finetune)
        desc.update(chosen)
    model, heads = fit_encoder_heads(desc, data.labels, subjects, train_idx, val_idx, class_names, encoder_sha,
                                     regions, seed, tails, TAIL_BLOCK, check if tails else None, frozen)
    return model, {"heads": heads, "finetune": report}


def fit_casia_model(net: RegionalEnsemble, data: PreparedData, class_names: list[str], train_idx, val_idx,
                    encode, encoder_sha: str, identity: bool = True, seed: int = 0) -> GestaltModel:
    """The trained CASIA-Nets as a model, with the identity member beside them (``identity``); the stack is
    fitted on the validation split (the networks' scores on their training photos are not held out)."""
    from shared.ml.members.casia import CasiaRegions

    train_idx, val_idx = np.asarray(train_idx, int), np.asarray(val_idx, int)
    members: list = [CasiaRegions(net.eval())]
    names = tuple(net.regions)
    if identity:
        desc = describe(data, (MEMBER,), encode)
        subjects = np.asarray([s.subject for s in data.samples])[train_idx]
        head = fit_identity_head(desc[MEMBER][train_idx], data.labels[train_idx], len(class_names), subjects, seed)
        members.append(IdentityMember(head, encoder_sha, {}, FLIP_DESCRIPTORS))
        names = (*names, MEMBER)
    kept = (MEMBER,) if identity else ()
    model = GestaltModel(list(class_names), members, Stack.equal(names, len(class_names)), CASIA,
                         descriptor_names=kept, encoder_sha=encoder_sha if identity else "", flip=FLIP_DESCRIPTORS,
                         gallery_names=kept)
    if len(val_idx):
        pred = score_data(model, data, val_idx, encode)
        model.stack = fit_stack(pred.member_probs, data.labels[val_idx], names,
                                f"the validation split ({len(val_idx)} photos)")
    if identity:
        choose_descriptor_space(model, data.descriptors, data.labels, train_idx, val_idx, seed, ((MEMBER,),))
    return model


def score_data(model: GestaltModel, data: PreparedData, index, encode, precision: str = "auto") -> Prediction:
    """:func:`~shared.ml.members.model.predict` over photos ``index`` of prepared data; descriptors already on
    ``data`` are not computed again."""
    index = np.asarray(index, int)
    known: dict[str, dict] = {"descriptors": {}, "features": {}}
    for n, d in data.descriptors.items():
        known["descriptors" if n == MEMBER else "features"][(crop_of(n), FLIP_DESCRIPTORS)] = d[index]
    return predict(model, data.stored_crops(index), encode, precision, known=known)


def member_report(model: GestaltModel, pred: Prediction, labels: np.ndarray) -> dict:
    """Each member's and the aggregate's top-1 (with its 95% Clopper-Pearson interval) on held-out photos, and each
    member's weight: what ``gestalt train`` prints and the version's metrics keep."""
    from shared.ml.evaluate import statistics as ev

    shares = model.stack.share_of()
    out = {}
    for i, name in enumerate(pred.names):
        hits = ev.topk_hits(pred.member_probs[:, i], labels, 1)
        out[name] = {"weight": shares.get(name, 0.0), "top1": ev.proportion_of(hits).as_dict()}
    out["aggregate"] = {"weight": 1.0, "top1": ev.proportion_of(ev.topk_hits(pred.aggregate, labels, 1)).as_dict()}
    return out

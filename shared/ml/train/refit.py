"""Fitting members on features that are already computed: the encoder members' heads on cached descriptors
(training, the nightly run and a clinic's first trained model), the CASIA members' heads on cached features,
and any model's holdout scores from them. Arrays in, a model out: the nightly run
(:mod:`shared.modelops.retrain`) does the database side.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from shared.ml.members.encoder_regions import EncoderRegions
from shared.ml.members.gallery import unit_concat, vector_scores
from shared.ml.members.identity import MEMBER, IdentityMember, build_ood_reference, fit_identity_head
from shared.ml.members.model import CASIA, ENCODER, GestaltModel
from shared.ml.members.stack import Stack, fit_stack

# Descriptors average each crop with its mirror image (shared.ml.nets.encoder.encode's flip): on the screening
# example (docs/examples/screening), new ORL people 0.93 -> 0.96 for the chip; the region cuts gain as much.
FLIP_DESCRIPTORS = True


@dataclass
class FeatureSet:
    """Photos as members see them once their networks have run: the regional member's features (``N x R x F``:
    CASIA-Nets' pooled features, or the encoder's stage features of the region cuts) and the identity descriptors."""

    features: np.ndarray | None  # N x R x F
    identity: np.ndarray | None  # N x 128
    regions: tuple[str, ...]

    def descriptors(self) -> dict[str, np.ndarray]:
        """What the encoder gave, by descriptor name (only meaningful when ``features`` are the encoder's)."""
        out = {r: self.features[:, i] for i, r in enumerate(self.regions)} if self.features is not None else {}
        if self.identity is not None:
            out[MEMBER] = self.identity
        return out


def fit_encoder_heads(desc: dict[str, np.ndarray], labels: np.ndarray, subjects, train_idx, val_idx,
                      class_names: list[str], encoder_sha: str, regions: tuple[str, ...], seed: int = 0,
                      tails: dict | None = None, tail_block: int = 0, check=None,
                      frozen: dict[str, np.ndarray] | None = None) -> tuple[GestaltModel, dict]:
    """A model of encoder members (a head per region's cut and on the face chip) fitted on ``train_idx`` of the
    descriptors ``desc`` (name -> ``N x 128``; a fine-tuned region's are its tail's), and its stack; the gallery's
    descriptor space (of the ``frozen`` encoder's descriptors, default ``desc``) chosen on ``val_idx``.

    The stack is fitted on held-out scores: without ``check``, the heads' own out-of-fold scores on the training
    photos' subject-grouped folds; with ``check`` (the training photos held out when tails were chosen, which the
    tails never saw), heads fitted on the rest of the training photos, scored on them. Returns the model and each
    head's selection."""
    names = (*regions, MEMBER)
    train_idx, val_idx = np.asarray(train_idx, int), np.asarray(val_idx, int)
    y, subjects = np.asarray(labels), np.asarray(subjects)
    heads = {n: fit_identity_head(desc[n][train_idx], y[train_idx], len(class_names), subjects[train_idx], seed)
             for n in names}
    if check is not None and len(check):
        fit = np.setdiff1d(train_idx, check)
        held = np.stack([fit_identity_head(desc[n][fit], y[fit], len(class_names), subjects[fit], seed)
                         .probs(desc[n][check]) for n in names], 1)
        stack = fit_stack(held, y[check], names, f"training photos held out from fine-tuning ({len(check)})")
    elif all(heads[n].oof is not None for n in names):
        stack = fit_stack(np.stack([heads[n].oof for n in names], 1), y[train_idx], names,
                          "out-of-fold scores of the training photos (3 subject-grouped folds)")
    else:
        stack = Stack.equal(names, len(class_names))
    members = [EncoderRegions(regions, {r: heads[r] for r in regions}, encoder_sha, FLIP_DESCRIPTORS, {},
                              dict(tails or {}), tail_block),
               IdentityMember(heads[MEMBER], encoder_sha, {}, FLIP_DESCRIPTORS)]
    model = GestaltModel(list(class_names), members, stack, ENCODER, descriptor_names=(*regions, MEMBER),
                         encoder_sha=encoder_sha, flip=FLIP_DESCRIPTORS)
    choose_descriptor_space(model, frozen or desc, y, train_idx, val_idx, seed)
    return model, {n: heads[n].selection for n in names}


def choose_descriptor_space(model: GestaltModel, desc: dict[str, np.ndarray], y: np.ndarray, train_idx, val_idx,
                            seed: int = 0, candidates: tuple[tuple[str, ...], ...] | None = None) -> None:
    """The descriptors the gallery and the OOD score use: the identity member's alone, or with the regions' where
    nearest-patient matching on ``val_idx`` (``train_idx`` as the gallery) is strictly better; then the OOD
    reference in that space."""
    candidates = candidates or ((MEMBER,), (MEMBER, *model.regions))
    candidates = tuple(c for c in candidates if all(n in desc for n in c))
    best, best_hits, trial = candidates[0], -1, {}
    for names in candidates:
        if len(val_idx) == 0:
            break
        vectors = unit_concat([desc[n] for n in names])
        scores = vector_scores(vectors[train_idx], y[train_idx], vectors[val_idx], model.num_classes)
        hits = int((scores.argmax(1) == y[val_idx]).sum())
        trial["+".join(names)] = round(hits / len(val_idx), 4)
        if hits > best_hits:
            best, best_hits = names, hits
    model.gallery_names = best
    space = unit_concat([desc[n] for n in best])
    model.ood = build_ood_reference(space[train_idx], space[val_idx] if len(val_idx) else None, seed)
    model.stack.fit = {**model.stack.fit, "descriptor_space": {"chosen": list(best), "validation_gallery_top1": trial}}


def member_probs(model: GestaltModel, data: FeatureSet) -> np.ndarray:
    """Every member's scores ``N x M x C`` from features already computed (no network runs)."""
    out = []
    for member in model.members:
        if member.kind == MEMBER:
            out.append(member.head.probs(data.identity)[:, None])
        elif member.kind == "encoder_regions":
            out.append(member.probs_from_features(data.features))
        else:  # CASIA-Nets: their final layers on the pooled features
            from shared.ml.train.heads import heads_of

            out.append(heads_of(member.net).probs(data.features))
    return np.concatenate(out, axis=1)


def aggregate_from_features(model: GestaltModel, data: FeatureSet) -> np.ndarray:
    """The model's aggregate ``N x C`` from features already computed (the nightly guard compares these)."""
    probs = member_probs(model, data)
    return model.stack.combine(probs[:, [model.names.index(n) for n in model.stack.names]])


def gallery_ranking(data: FeatureSet, names: tuple[str, ...], labels: np.ndarray, gallery_mask: np.ndarray,
                    query_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Class scores of the photos ``query_idx`` by their nearest gallery patient (the gallery-only model's ranking),
    comparable to a model's aggregate by top-k."""
    desc = data.descriptors()
    vectors = unit_concat([desc[n] for n in names])
    return vector_scores(vectors[gallery_mask], labels[gallery_mask], vectors[query_idx], n_classes)


def refit(model: GestaltModel, data: FeatureSet, train_mask: np.ndarray, labels: np.ndarray, subjects,
          class_names: list[str], head_epochs: int = 30, seed: int = 0) -> GestaltModel:
    """The night's candidate: ``model``'s members refitted on the training rows of ``data`` for ``class_names``
    (the active model's classes, then new syndromes). Encoder members get new heads and a new stack (their
    out-of-fold scores); CASIA-Nets get new final layers from their pooled features and keep the stack the model
    was trained with; the OOD reference is rebuilt on the training rows."""
    train_idx, hold_idx = np.flatnonzero(train_mask), np.flatnonzero(~train_mask)
    if model.backbone in (ENCODER, "none"):
        regional = model.member("encoder_regions")
        regions = model.regions or tuple(r for r in data.regions)
        tails, block = (regional.tails, regional.tail_block) if regional is not None else ({}, 0)
        candidate, _ = fit_encoder_heads(data.descriptors(), labels, subjects, train_idx, hold_idx, class_names,
                                         model.encoder_sha, regions, seed, tails, block)
        if tails:  # the tails saw the original training photos: their out-of-fold scores are not held out
            candidate.stack = _padded(model.stack, len(class_names))
        return candidate
    return _refit_casia(model, data, train_idx, hold_idx, labels, subjects, class_names, head_epochs, seed)


def _refit_casia(model: GestaltModel, data: FeatureSet, train_idx, hold_idx, labels, subjects,
                 class_names: list[str], head_epochs: int, seed: int) -> GestaltModel:
    from shared.ml.members.casia import CasiaRegions
    from shared.ml.train.heads import HeadConfig, train_heads, with_heads

    y = np.asarray(labels)
    members = []
    for member in model.members:
        if isinstance(member, CasiaRegions):
            heads = train_heads(data.features[train_idx], y[train_idx], len(class_names),
                                HeadConfig(epochs=head_epochs))
            members.append(CasiaRegions(with_heads(member.net, heads)))
        else:
            head = fit_identity_head(data.identity[train_idx], y[train_idx], len(class_names),
                                     np.asarray(subjects)[train_idx], seed)
            members.append(IdentityMember(head, member.encoder_sha, member.validation, member.flip))
    stack = _padded(model.stack, len(class_names))
    candidate = GestaltModel(list(class_names), members, stack, CASIA, None, model.descriptor_names,
                             model.encoder_sha, model.flip, model.contract, model.gallery_names)
    if model.descriptor_names and data.identity is not None:
        space = unit_concat([data.identity])
        candidate.ood = build_ood_reference(space[train_idx], space[hold_idx] if len(hold_idx) else None, seed)
    return candidate


def _padded(stack: Stack, n_classes: int) -> Stack:
    """A copy of ``stack`` whose class biases cover ``n_classes`` (new classes start at the mean bias)."""
    stack = copy.deepcopy(stack)
    if stack.bias is not None and len(stack.bias) < n_classes:
        stack.bias = np.concatenate([stack.bias, np.full(n_classes - len(stack.bias), stack.bias.mean())])
    return stack

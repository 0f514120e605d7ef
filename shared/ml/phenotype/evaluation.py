"""The simulation's evaluation: face-only, gallery, phenotype-only and joint ranks of the true syndrome of
simulated patients, as rows with Wilson intervals and as a markdown table (``python -m shared.ml.phenotype``)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.ml.phenotype.joint import PHENOTYPE_FEATURES, Combiner, candidate_features
from shared.ml.phenotype.ranking import PhenotypeRanker
from shared.ml.phenotype.simulation import (
    ASSIGNMENT_NOTE,
    FACIAL_SYNDROMES,
    NOISE_LEVELS,
    FacialPredictions,
    NoiseLevel,
    SimulatedCase,
    facial_predictions,
    gallery_similarities,
    load_embeddings,
    simulate_cases,
    split_subjects,
)


def true_rank(scores: np.ndarray, true: int) -> float:
    """1-based rank of ``true``; tied syndromes count half (the expected rank under random tie-breaking)."""
    t = scores[true]
    return 1.0 + float((scores > t).sum()) + 0.5 * float((scores == t).sum() - 1)


def wilson(hits: int, n: int) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(hits, n, alpha=0.05, method="wilson")
    return float(low), float(high)


def _row(level: str, cohort: str, method: str, ranks: list[float], top_prob: list[float] | None = None) -> dict:
    r = np.asarray(ranks)
    n = len(r)
    row = {"level": level, "cohort": cohort, "method": method, "n": n}
    for k in (1, 10):
        hits = int((r <= k).sum())
        low, high = wilson(hits, n)
        row.update({f"top{k}": hits / n, f"top{k}_low": low, f"top{k}_high": high})
    row["median_rank"] = float(np.median(r))
    if top_prob is not None:  # calibration: the mean probability given to the top-ranked syndrome
        row["mean_top_probability"] = float(np.mean(top_prob))
    return row


METHODS = ("face", "gallery", "phenotype", "phenotype (learned)", "phenotype + facial prior", "joint")
COHORTS = ("facial", "gallery", "other")
# The last disorders by ID that the simulation's facial model has no class for (gallery patients only).
GALLERY_ONLY = 3

def evaluate_simulation(embeddings: Path, ranker: PhenotypeRanker | None = None,
                        levels: tuple[NoiseLevel, ...] = NOISE_LEVELS, n_train: int = 400, n_eval: int = 400,
                        other_fraction: float = 0.5, folds: int = 5, seed: int = 0,
                        n_terms: tuple[int, int] = (3, 8), phenotype_key: str = "adjusted",
                        cache_dir: Path | None = None, progress=None, gallery_only: int = GALLERY_ONLY) -> dict:
    """The Köhler et al. (2009) simulation with real held-out facial predictions. Returns
    ``{"rows": [...], "combiner": dict, "phenotype_combiner": dict, "note": str, "seconds": float}``.

    1. The last ``gallery_only`` disorders of ``embeddings`` (``{disorder: {subject: {image:
       vector}}}``, sorted by ID) are gallery-only: the facial model has no class for them. Facial
       predictions for the others: out of fold, 5-fold GroupKFold by subject; and leave-one-disorder-out
       for unknown syndromes.
    2. Subjects are split in halves per disorder: training cases draw their photos from one,
       evaluation cases from the other; terms are drawn afresh for every case. The training half's
       photos of every disorder are the gallery of diagnosed patients (a case never matches its own
       subject): each case's photo gets its nearest-patient cosine similarity per syndrome.
    3. Per noise level, ``n_train`` training and ``n_eval`` evaluation cases, ``other_fraction``
       of them with a catalogue syndrome outside the 10 (no facial model, no gallery patients), the
       rest cycling through the 10. The combiner is fitted once, on the training cases of all levels
       together (a clinic does not know its noise level).
    4. Ranks of the true syndrome among all catalogue diseases: face-only (the facial syndromes
       by probability, everything else after them, tied), gallery (the 10 syndromes by nearest
       patient, the rest tied after them), phenotype-only (``phenotype_key`` of
       :class:`PhenotypeScores`), the phenotype recalibrated by a combiner without face features,
       the phenotype with the indicators of facial-model and gallery syndromes (no photo), and joint.
       Rows per level and cohort (``facial``: the true syndrome has a facial model; ``gallery``:
       gallery patients only; ``other``: neither) with top-1 and top-10 and their 95% Wilson intervals.
    """
    t0 = time.monotonic()
    say = progress or (lambda msg: None)
    ranker = ranker or PhenotypeRanker.load(cache_dir)
    feats, labels, subjects, disorders = load_embeddings(embeddings)
    facial = _facial_disorders(disorders, gallery_only)
    say(f"facial predictions ({len(labels)} images, {int(facial.sum())} disorders with a facial model, "
        f"{folds}-fold by subject and leave-one-disorder-out)")
    preds = facial_predictions(feats, labels, subjects, disorders, folds, facial)
    held = split_subjects(preds, 0.5, seed)
    gallery = gallery_similarities(feats, labels, subjects, ~held, len(disorders))
    train, evaluation = _simulate_halves(ranker, preds, held, gallery, levels, n_train, n_eval, other_fraction,
                                         n_terms, seed)
    say(f"features of {len(train)} training cases")
    combiners = _fit_combiners(ranker, train, seed)
    say(f"ranking {len(evaluation)} evaluation cases")
    ranks, top_prob = _rank_cases(ranker, evaluation, combiners, phenotype_key)
    return {"rows": _rows(levels, ranks, top_prob), "combiner": combiners.joint.to_dict(),
            "phenotype_combiner": combiners.phenotype.to_dict(), "prior_combiner": combiners.prior.to_dict(),
            "other_fraction": other_fraction, "note": ASSIGNMENT_NOTE, "seconds": round(time.monotonic() - t0, 1),
            **_assignment(disorders, facial, preds)}


def _facial_disorders(disorders: list[str], gallery_only: int) -> np.ndarray:
    """Per disorder, whether the facial model has a class for it (all but the last ``gallery_only``)."""
    if len(disorders) != len(FACIAL_SYNDROMES):
        raise ValueError(f"the simulation assigns {len(FACIAL_SYNDROMES)} disorders, not {len(disorders)}")
    if not 0 <= gallery_only < len(disorders) - 1:
        raise ValueError(f"gallery_only must be between 0 and {len(disorders) - 2}")
    return np.arange(len(disorders)) < len(disorders) - gallery_only


def _simulate_halves(ranker: PhenotypeRanker, preds: FacialPredictions, held: np.ndarray, gallery: np.ndarray,
                     levels: tuple[NoiseLevel, ...], n_train: int, n_eval: int, other_fraction: float,
                     n_terms: tuple[int, int], seed: int) -> tuple[list[SimulatedCase], list[SimulatedCase]]:
    """``(training cases, evaluation cases)`` of every noise level: photos of the training half of the
    subjects (``~held``) and of the evaluation half (``held``)."""
    rng = np.random.default_rng(seed)
    n_other_train = round(other_fraction * n_train)
    n_other_eval = round(other_fraction * n_eval)
    train, evaluation = [], []
    for level in levels:
        train += simulate_cases(ranker, preds, ~held, level, n_train - n_other_train, n_other_train, rng,
                                n_terms=n_terms, gallery=gallery)
        evaluation += simulate_cases(ranker, preds, held, level, n_eval - n_other_eval, n_other_eval, rng,
                                     n_terms=n_terms, gallery=gallery)
    return train, evaluation


@dataclass
class _Combiners:
    joint: Combiner  # every feature
    phenotype: Combiner  # the phenotype features alone, recalibrated
    prior: Combiner  # the phenotype and which syndromes have a facial model or gallery patients, without the photo


def _fit_combiners(ranker: PhenotypeRanker, train: list[SimulatedCase], seed: int) -> _Combiners:
    """The three combiners, fitted on the training cases of all levels together (a clinic does not know its
    noise level)."""
    train_x = [(candidate_features(ranker.scores_of(c.terms), c.face, c.gallery), c.disease) for c in train]
    combiner = Combiner(meta={"trained_on": "simulated cases", "seed": seed}).fit(train_x, seed=seed)
    pheno_combiner = Combiner(features=PHENOTYPE_FEATURES, meta={"trained_on": "simulated cases"}).fit(
        train_x, seed=seed)
    # Which syndromes have a facial model or gallery patients, without the photo: how much of the joint's
    # gain is that prior alone.
    prior_combiner = Combiner(features=PHENOTYPE_FEATURES + ("facial_model", "in_gallery"),
                              meta={"trained_on": "simulated cases"}).fit(train_x, seed=seed)
    return _Combiners(combiner, pheno_combiner, prior_combiner)


def _method_scores(ranker: PhenotypeRanker, c: SimulatedCase, combiners: _Combiners,
                   phenotype_key: str) -> dict[str, np.ndarray]:
    """Every method's scores of the catalogue for one evaluation case (``gallery`` only with a gallery)."""
    s = ranker.scores_of(c.terms)
    x = candidate_features(s, c.face, c.gallery)
    face_scores = np.where(np.isnan(c.face), -np.inf, c.face)
    outputs = {"face": face_scores, "phenotype": s.key(phenotype_key),
               "phenotype (learned)": combiners.phenotype.scores(x),
               "phenotype + facial prior": combiners.prior.scores(x), "joint": combiners.joint.scores(x)}
    if c.gallery is not None:
        outputs["gallery"] = np.where(np.isnan(c.gallery), -np.inf, c.gallery)
    return outputs


def _rank_cases(ranker: PhenotypeRanker, evaluation: list[SimulatedCase], combiners: _Combiners,
                phenotype_key: str) -> tuple[dict[tuple, list], dict[tuple, list]]:
    """``(ranks, top_prob)`` by ``(level, cohort, method)``: the true syndrome's rank under each method, and
    the joint's probability for its top syndrome."""
    ranks: dict[tuple, list] = defaultdict(list)
    top_prob: dict[tuple, list] = defaultdict(list)
    for c in evaluation:
        outputs = _method_scores(ranker, c, combiners, phenotype_key)
        for method, values in outputs.items():
            if method == "face" and c.cohort != "facial":
                continue  # always a miss: the facial model does not know the syndrome
            if method == "gallery" and c.cohort != "gallery":
                continue  # the face-only analogue for gallery-only syndromes
            ranks[(c.level, c.cohort, method)].append(true_rank(values, c.disease))
        joint = outputs["joint"]
        p = np.exp(joint - joint.max())
        top_prob[(c.level, c.cohort, "joint")].append(float(p.max() / p.sum()))
    return ranks, top_prob


def _rows(levels: tuple[NoiseLevel, ...], ranks: dict[tuple, list], top_prob: dict[tuple, list]) -> list[dict]:
    """One row per level, cohort and method that ranked any case, in that order."""
    rows = []
    for level in levels:
        for cohort in COHORTS:
            for method in METHODS:
                key = (level.name, cohort, method)
                if ranks.get(key):
                    rows.append(_row(level.name, cohort, method, ranks[key], top_prob.get(key)))
    return rows


def _assignment(disorders: list[str], facial: np.ndarray, preds: FacialPredictions) -> dict:
    """Which catalogue syndrome each disorder stands for, the gallery-only ones, and the facial model's
    top-1 on its own classes."""
    labels = preds.labels
    return {"assignment": dict(zip(disorders, FACIAL_SYNDROMES, strict=True)),
            "gallery_only": [f"{d} as {code}" for d, code, f in zip(disorders, FACIAL_SYNDROMES, facial, strict=True)
                             if not f],
            "face_top1_known": float((preds.known[facial[labels]].argmax(1) == labels[facial[labels]]).mean())}


def format_table(result: dict) -> str:
    """The simulation's rows as a markdown table, with the assignment note."""
    lines = ["| noise | true syndrome | method | n | top-1 (95% CI) | top-10 (95% CI) | median rank | mean P(top) |",
             "|---|---|---|---|---|---|---|---|"]
    cohorts = {"facial": "has a facial model", "gallery": "gallery patients only", "other": "neither"}
    for r in result["rows"]:
        cells = [f"{100 * r[f'top{k}']:.1f}% ({100 * r[f'top{k}_low']:.1f}–{100 * r[f'top{k}_high']:.1f})"
                 for k in (1, 10)]
        prob = f"{100 * r['mean_top_probability']:.1f}%" if "mean_top_probability" in r else ""
        lines.append(f"| {r['level']} | {cohorts[r['cohort']]} | {r['method']} | {r['n']} | {cells[0]} | {cells[1]} "
                     f"| {r['median_rank']:g} | {prob} |")
    w = result["combiner"]["weights"]
    gallery_only = result.get("gallery_only") or []
    lines += ["", "Joint weights (raw features): " + ", ".join(f"{k} {v:+.3f}" for k, v in w.items()),
              "", result["note"],
              (f"Gallery patients only (no facial-model class; the training half's patients of every disorder form "
               f"the gallery): {', '.join(gallery_only)}." if gallery_only else "No gallery-only syndromes."),
              "Face-only ranks the facial model's syndromes by probability and every other syndrome after them "
              "(tied); it is shown only for patients whose syndrome has a facial model (else always a miss). "
              "gallery: the 10 syndromes by their nearest gallery patient's cosine similarity, shown for patients "
              "whose syndrome has gallery patients only.",
              "phenotype: PhenotypeRanker's adjusted similarity; phenotype (learned): the combiner fitted on the "
              "phenotype features alone; phenotype + facial prior: plus the indicators of the facial model's classes "
              "and of the gallery-only syndromes (no photo); joint: plus the photo's facial log-probability and, for "
              "gallery-only syndromes, its nearest-patient similarity and rank.",
              f"Simulated patients: {100 * (1 - result.get('other_fraction', 0.5)):.0f}% with one of the 10 syndromes, "
              "the rest with a random catalogue syndrome and the facial prediction for a photo of a disorder the "
              "facial model never saw (left out of the gallery). mean P(top): the joint's mean probability for its top "
              "syndrome (calibration: compare with top-1).",
              "Intervals: 95% Wilson score intervals. Ranks among all catalogue diseases; ties count half."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.ml.phenotype", description=__doc__.split("\n")[0])
    parser.add_argument("--embeddings", type=Path, required=True,
                        help="mini_gm-style pickle {disorder: {subject: {image: 320-d vector}}}")
    parser.add_argument("--train", type=int, default=400, help="training cases per noise level")
    parser.add_argument("--eval", type=int, default=400, help="evaluation cases per noise level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--other-fraction", type=float, default=0.5,
                        help="share of simulated patients whose syndrome has no facial model")
    parser.add_argument("--gallery-only", type=int, default=GALLERY_ONLY,
                        help="disorders (the last by ID) without a facial-model class, gallery patients only")
    parser.add_argument("--json", type=Path, help="also write the rows and the fitted combiner here")
    args = parser.parse_args(argv)
    if not args.embeddings.exists():
        print(f"{args.embeddings} is absent", file=sys.stderr)
        return 2
    result = evaluate_simulation(args.embeddings, n_train=args.train, n_eval=args.eval, seed=args.seed,
                                 other_fraction=args.other_fraction, gallery_only=args.gallery_only,
                                 progress=lambda m: print(m, file=sys.stderr))
    print(format_table(result))
    print(f"\n{result['seconds']} s", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0

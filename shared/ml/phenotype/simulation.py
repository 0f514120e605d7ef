"""Simulated patients (Köhler et al. 2009): terms sampled from a syndrome's annotations with imprecision and
noise, each joined with a real held-out facial prediction and nearest-patient similarities to a gallery."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.ml.phenotype.index import HpoIndex
from shared.ml.phenotype.ranking import PhenotypeRanker

# Annotations without a frequency: how often the simulation draws them, relative to the others.
DEFAULT_FREQUENCY = 0.5


@dataclass(frozen=True)
class NoiseLevel:
    """How simulated patients' terms depart from their syndrome's annotations."""

    name: str
    imprecision: float = 0.0  # probability that each term is replaced by one of its parents
    noise: float = 0.0  # random terms added, as a fraction of the patient's syndrome terms (rounded up)


NOISE_LEVELS = (NoiseLevel("exact"), NoiseLevel("imprecision", 1.0, 0.0), NoiseLevel("imprecision+noise", 1.0, 0.5))


def simulate_terms(index: HpoIndex, disease: int, rng: np.random.Generator, n_terms: int, level: NoiseLevel,
                   pool: np.ndarray) -> np.ndarray:
    """Term indices of one simulated patient of ``disease`` (an index into ``index.dis_codes``).

    ``n_terms`` of the disease's annotations are drawn without replacement, each with probability
    proportional to its annotated frequency (``DEFAULT_FREQUENCY`` where none is given; excluded
    ones never). Imprecision replaces a term by one of its parents (never by the phenotypic
    abnormality root); noise adds random terms from ``pool``.
    """
    lo, hi = index.ann.indptr[disease], index.ann.indptr[disease + 1]
    terms, freq = index.ann.indices[lo:hi], index.ann.data[lo:hi].astype(np.float64)
    freq = np.where(np.isnan(freq), DEFAULT_FREQUENCY, freq)
    terms, freq = terms[freq > 0], freq[freq > 0]
    if len(terms) == 0:
        return np.zeros(0, np.int64)
    k = min(n_terms, len(terms))
    chosen = rng.choice(terms, size=k, replace=False, p=freq / freq.sum())
    if level.imprecision > 0:
        out = []
        for t in chosen:
            if rng.random() < level.imprecision:
                ps = index.parents.indices[index.parents.indptr[t]:index.parents.indptr[t + 1]]
                ps = ps[index.in_pa[ps]]
                if len(ps):
                    t = rng.choice(ps)
            out.append(t)
        chosen = np.array(out)
    if level.noise > 0:
        chosen = np.concatenate([chosen, rng.choice(pool, size=math.ceil(level.noise * k), replace=False)])
    return np.unique(chosen).astype(np.int64)


# ----- simulated cases: real facial predictions, simulated phenotypes ------------------------------

# Ten catalogue syndromes with distinctive faces and rich annotations. The simulation assigns the
# mini_gm disorders to them in this order (the disorders sorted by ID): a simulation device, not a
# claim about which syndromes those disorders are.
FACIAL_SYNDROMES = (
    "OMIM:190685",  # Down syndrome
    "OMIM:194050",  # Williams-Beuren syndrome
    "OMIM:163950",  # Noonan syndrome 1
    "OMIM:122470",  # Cornelia de Lange syndrome 1
    "OMIM:147920",  # Kabuki syndrome 1
    "OMIM:105830",  # Angelman syndrome
    "OMIM:182290",  # Smith-Magenis syndrome
    "OMIM:188400",  # DiGeorge syndrome (22q11.2 deletion)
    "OMIM:180849",  # Rubinstein-Taybi syndrome 1
    "OMIM:117550",  # Sotos syndrome 1
)
ASSIGNMENT_NOTE = ("Simulation device: the 10 mini_gm disorders (real facial features, sorted by ID) stand for "
                   "10 catalogue syndromes with distinctive faces; the assignment is arbitrary, the phenotypes "
                   "are simulated from those syndromes' HPO annotations.")


def load_embeddings(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(features N x F, labels N, subjects N, disorders)`` from ``{disorder: {subject: {image: vector}}}``."""
    import pickle  # nosec B403

    # A features file the caller names (the project's own shared data, or the CLI's argument).
    with Path(path).open("rb") as fh:
        raw = pickle.load(fh)  # noqa: S301  # nosec B301
    feats, labels, subjects = [], [], []
    disorders = sorted(raw, key=str)
    for ci, disorder in enumerate(disorders):
        for subject, images in raw[disorder].items():
            for vector in images.values():
                feats.append(np.asarray(vector, np.float32).ravel())
                labels.append(ci)
                subjects.append(f"{disorder}/{subject}")
    return np.stack(feats), np.asarray(labels), np.asarray(subjects), [str(d) for d in disorders]


@dataclass
class FacialPredictions:
    """Held-out facial-model probabilities for every image of a features set.

    The facial model has classes for the disorders marked ``facial`` only (the others are
    gallery-only: diagnosed patients, no class). ``known``: the model's prediction for the image as
    a patient of its own disorder: out of fold (5-fold GroupKFold by subject) for the facial
    disorders; for the gallery-only ones, the model trained on all facial disorders (it never saw
    theirs). ``unknown``: the model never saw the image's disorder (trained on the other facial
    disorders; that class's column is 0), what a face of a syndrome without a facial model gets.
    Columns of gallery-only disorders are 0.
    """

    known: np.ndarray  # N x C
    unknown: np.ndarray  # N x C
    labels: np.ndarray  # N
    subjects: np.ndarray  # N
    disorders: list[str]
    facial: np.ndarray = None  # type: ignore[assignment]  # C bool: the facial model has a class for it

    def __post_init__(self):
        if self.facial is None:
            self.facial = np.ones(len(self.disorders), bool)


def facial_predictions(features: np.ndarray, labels: np.ndarray, subjects: np.ndarray, disorders: list[str],
                       folds: int = 5, facial: np.ndarray | None = None) -> FacialPredictions:
    """Out-of-fold probabilities of a standardised logistic regression (C=0.1, balanced): the data
    README's baseline, about 0.77 top-1 per image on mini_gm. ``facial``: per disorder, whether the
    facial model has a class for it (default: all)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_classes = len(disorders)
    facial = np.ones(n_classes, bool) if facial is None else np.asarray(facial, bool)
    in_model = facial[labels]

    def model():
        return make_pipeline(StandardScaler(), LogisticRegression(C=0.1, class_weight="balanced", max_iter=2000))

    known = np.zeros((len(labels), n_classes))
    rows = np.flatnonzero(in_model)
    for train, test in GroupKFold(n_splits=folds).split(features[rows], labels[rows], groups=subjects[rows]):
        train, test = rows[train], rows[test]
        m = model().fit(features[train], labels[train])
        known[np.ix_(test, m[-1].classes_)] = m.predict_proba(features[test])
    unknown = np.zeros_like(known)
    if not in_model.all():  # gallery-only disorders: the whole facial model never saw them
        m = model().fit(features[in_model], labels[in_model])
        out = np.flatnonzero(~in_model)
        known[np.ix_(out, m[-1].classes_)] = unknown[np.ix_(out, m[-1].classes_)] = m.predict_proba(features[out])
    for c in np.flatnonzero(facial):
        out = labels == c
        m = model().fit(features[in_model & ~out], labels[in_model & ~out])
        unknown[np.ix_(np.flatnonzero(out), m[-1].classes_)] = m.predict_proba(features[out])
    return FacialPredictions(known, unknown, labels, subjects, disorders, facial)


def gallery_similarities(features: np.ndarray, labels: np.ndarray, subjects: np.ndarray, gallery: np.ndarray,
                         n_classes: int) -> np.ndarray:
    """``N x C``: each image's cosine similarity to the nearest gallery photo of each disorder, as
    :mod:`shared.ml.members.gallery` computes it (regions normalised, then the whole); the gallery is the
    images where ``gallery`` is true, less the image's own subject (-inf: no photo)."""
    from shared.ml.members.gallery import gallery_vectors

    v = gallery_vectors(features)
    g = np.flatnonzero(gallery)
    sims = v @ v[g].T
    sims[subjects[:, None] == subjects[g][None, :]] = -np.inf
    out = np.full((len(labels), n_classes), -np.inf)
    for c in range(n_classes):
        cols = labels[g] == c
        if cols.any():
            out[:, c] = sims[:, cols].max(axis=1)
    return out


@dataclass
class SimulatedCase:
    disease: int  # index of the true syndrome in the catalogue
    terms: np.ndarray  # term indices
    face: np.ndarray  # D facial probabilities (NaN: no facial model for that syndrome)
    facial: bool  # the true syndrome has a facial model
    level: str
    gallery: np.ndarray | None = None  # D nearest-gallery-patient similarities (NaN: no gallery patients)
    cohort: str = ""  # "facial", "gallery" (gallery patients, no facial model) or "other"

    def __post_init__(self):
        self.cohort = self.cohort or ("facial" if self.facial else "other")


def split_subjects(preds: FacialPredictions, fraction: float = 0.5, seed: int = 0) -> np.ndarray:
    """Per image: is its subject on the evaluation side? Half of each disorder's subjects, at random."""
    rng = np.random.default_rng(seed)
    held = set()
    for c in range(len(preds.disorders)):
        subs = sorted(set(preds.subjects[preds.labels == c].tolist()))
        rng.shuffle(subs)
        held.update(subs[:max(1, round(fraction * len(subs)))])
    return np.isin(preds.subjects, list(held))


def simulate_cases(ranker: PhenotypeRanker, preds: FacialPredictions, images: np.ndarray, level: NoiseLevel,
                   n_facial: int, n_other: int, rng: np.random.Generator,
                   syndromes: tuple[str, ...] = FACIAL_SYNDROMES, n_terms: tuple[int, int] = (3, 8),
                   min_annotations: int = 3, gallery: np.ndarray | None = None) -> list[SimulatedCase]:
    """Simulated patients, each with a real held-out face (drawn among ``images``) and simulated terms.

    ``n_facial`` patients have one of the assigned ``syndromes`` (cycled through) and the facial
    model's prediction for a photo of a subject of the assigned disorder (out of fold where the
    model has a class for it; cohort ``"gallery"`` where it has not); ``n_other`` have a catalogue
    syndrome outside them (any disease with at least ``min_annotations`` annotations) and the
    prediction for a photo of a facial disorder the model never saw. The number of terms is
    uniform in ``n_terms``. ``gallery`` (``N x C``, :func:`gallery_similarities`) gives each case
    its photo's nearest-patient similarity per assigned syndrome; an "other" case's own disorder is
    left out of the gallery (its photo stands for a syndrome nobody diagnosed).
    """
    index = ranker.index
    pos = {c: i for i, c in enumerate(index.dis_codes.tolist())}
    facial_idx = np.array([pos[c] for c in syndromes])
    by_class = [np.flatnonzero(images & (preds.labels == c)) for c in range(len(syndromes))]
    by_subject = {}
    for i in np.flatnonzero(images):
        by_subject.setdefault(preds.subjects[i], []).append(i)
    subjects_by_class = [sorted({preds.subjects[i] for i in b}) for b in by_class]
    counts = np.diff(index.ann.indptr)
    others = np.setdiff1d(np.flatnonzero(counts >= min_annotations), facial_idx)
    pool = np.flatnonzero(images & preds.facial[preds.labels])
    model_idx = facial_idx[preds.facial]
    cases = []

    def face_vector(probs):
        v = np.full(index.n_diseases, np.nan)
        v[model_idx] = probs[preds.facial]
        return v

    def gallery_vector(image, leave_out=None):
        if gallery is None:
            return None
        sims = gallery[image].astype(np.float64)
        if leave_out is not None:
            sims[leave_out] = -np.inf
        v = np.full(index.n_diseases, np.nan)
        v[facial_idx] = np.where(np.isfinite(sims), sims, np.nan)
        return v

    for i in range(n_facial + n_other):
        if i < n_facial:
            c = i % len(syndromes)
            subject = subjects_by_class[c][rng.integers(len(subjects_by_class[c]))]
            image = rng.choice(by_subject[subject])  # one photo of a random patient: patients weigh equally
            disease, probs, leave_out = facial_idx[c], preds.known[image], None
            cohort = "facial" if preds.facial[c] else "gallery"
        else:
            disease = rng.choice(others)
            image = rng.choice(pool)
            probs, leave_out, cohort = preds.unknown[image], preds.labels[image], "other"
        k = int(rng.integers(n_terms[0], n_terms[1] + 1))
        terms = simulate_terms(index, int(disease), rng, k, level, ranker.term_pool)
        cases.append(SimulatedCase(int(disease), terms, face_vector(probs), cohort == "facial", level.name,
                                   gallery_vector(image, leave_out), cohort))
    return cases

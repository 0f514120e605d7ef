"""The disease annotations of ``phenotype.hpoa`` as arrays, and the information content they give each term."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

from shared.ml.phenotype.ontology import Ontology

# Frequency terms of phenotype.hpoa (HP:0040279 subtree), as the midpoints of their ranges.
FREQUENCY_TERMS = {"HP:0040280": 1.0, "HP:0040281": 0.9, "HP:0040282": 0.55, "HP:0040283": 0.17,
                   "HP:0040284": 0.025, "HP:0040285": 0.0}


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
class Annotations:
    """The catalogue diseases (OMIM first, then Orphanet, by number) and their annotations."""

    codes: list[str]  # D, "OMIM:122470"
    names: list[str]  # D
    ann: sparse.csr_matrix  # D x T, float32 frequency of each direct annotation (NaN: unknown)
    dis_anc: sparse.csc_matrix  # D x T, bool: annotated with the term or one of its descendants
    ic: np.ndarray  # T, float64: -log(fraction of annotated diseases carrying the term)


def read_annotations(path: Path, ontology: Ontology) -> Annotations:
    """Parse ``phenotype.hpoa``: OMIM and Orphanet diseases, positive phenotypic-abnormality annotations."""
    names, freq = _read_hpoa(path, ontology)
    codes = sorted(names, key=lambda c: (c.split(":")[0] != "OMIM", int(c.split(":")[1])))
    dpos = {c: i for i, c in enumerate(codes)}
    keys = list(freq)
    drow = np.array([dpos[c] for c, _ in keys], dtype=np.int64)
    dcol = np.array([t for _, t in keys], dtype=np.int64)
    fvals = np.array([freq[k] for k in keys], dtype=np.float32)
    shape = (len(codes), len(ontology.ids))
    ann = sparse.csr_matrix((fvals, (drow, dcol)), shape=shape)
    ann.sort_indices()
    present = sparse.csr_matrix((np.ones(len(drow), np.float32), (drow, dcol)), shape=shape)
    dis_anc = ((present @ ontology.anc.astype(np.float32)) > 0).tocsc()
    ic = information_content(dis_anc, present, ontology.in_pa)
    return Annotations(codes=codes, names=[names[c] for c in codes], ann=ann, dis_anc=dis_anc, ic=ic)


def _read_hpoa(path: Path, ontology: Ontology) -> tuple[dict[str, str], dict[tuple[str, int], float]]:
    """``(names, freq)``: each disease's name, and the frequency of each ``(disease, term index)``
    annotation (the highest given; NaN where none is)."""
    names: dict[str, str] = {}
    freq: dict[tuple[str, int], float] = {}
    index, alias, in_pa = ontology.index, ontology.alias, ontology.in_pa
    with path.open(newline="") as fh:
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
    return names, freq


def information_content(dis_anc: sparse.csc_matrix, present: sparse.csr_matrix, in_pa: np.ndarray) -> np.ndarray:
    """Each term's ``-log`` fraction of the annotated diseases that carry it or a descendant (terms no
    disease carries get the rarest possible value; terms outside the subtree 0: never compared)."""
    counts = np.asarray(dis_anc.sum(axis=0)).ravel()
    annotated = max(1, int((np.diff(present.indptr) > 0).sum()))
    ic = np.where(counts > 0, -np.log(np.maximum(counts, 1) / annotated), np.log(annotated))
    ic[~in_pa] = 0.0  # terms outside the subtree are never compared
    return ic.astype(np.float64)

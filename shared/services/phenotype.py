"""Face and phenotype on the case page: the phenotype ranking of the case's HPO terms over the whole
catalogue and, where a fitted combination is installed, the joint ranking with each part's share. A joint
row's face part comes from the facial model (syndromes it has a class for), from diagnosed gallery patients
(syndromes it has no class for: the nearest patient's similarity, as the similar-patients list computes it),
or from neither (phenotype alone).

The ontology arrays load once per process on first use (from the cache `gestalt catalog load` fills);
the combination's weights are fitted on data by `gestalt evaluate-phenotype --install` and read from
the object store. Nothing here imports torch. The view's side (:mod:`web.phenotype`) only adds the per-request gallery.
"""
from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.models import Case, ModelVersion, Syndrome
from shared.services.ranking import CaseRanking

logger = logging.getLogger(__name__)
TOP = 10
_combiner_cache: dict[str, object] = {"etag": None, "value": None}


class CombinerUnavailable(RuntimeError):
    """The object store refused to read the installed combination (not: none is installed)."""


def installed_combiner():
    """The installed :class:`~shared.ml.phenotype.Combiner`, or None when none is installed (one HEAD request;
    read again when the stored object changes).

    Raises:
        CombinerUnavailable: the object store answered with another error (``AccessDenied``, ...): logged as an
            error, and the case page shows it in place of the joint ranking.
    """
    from minio.error import S3Error

    from shared.ml.phenotype.joint import Combiner
    from shared.storage import MISSING, PHENOTYPE_COMBINER_KEY, get_storage

    storage = get_storage()
    try:
        etag = storage.client.stat_object(storage.bucket, PHENOTYPE_COMBINER_KEY).etag
    except S3Error as exc:
        if exc.code not in MISSING:
            logger.error("phenotype combiner %s unreadable: %s %s", PHENOTYPE_COMBINER_KEY, exc.code, exc.message)
            raise CombinerUnavailable(
                f"the joint ranking is unavailable: the object store refused to read the installed combination "
                f"({exc.code}); an administrator must check the object store's permissions") from exc
        etag = None
    if etag != _combiner_cache["etag"]:
        value = None
        if etag is not None:
            try:
                value = Combiner.from_dict(json.loads(storage.get(PHENOTYPE_COMBINER_KEY)))
            except (ValueError, KeyError) as exc:
                logger.error("phenotype combiner unreadable: %s", exc)
        _combiner_cache.update(etag=etag, value=value)
    return _combiner_cache["value"]


def combiner_status() -> dict:
    """For the admin's models page: whether a combination is installed, or why it cannot be read."""
    try:
        combiner = installed_combiner()
    except CombinerUnavailable as exc:
        return {"error": str(exc)}
    return {"installed": combiner is not None, "meta": combiner.meta if combiner is not None else None}


_loading: dict[str, object] = {"thread": None, "error": None}


def ranker(wait: float = 3.0):
    """The process's phenotype ranker; None while it is still loading (a first load without the cache that
    `gestalt catalog load` fills takes tens of seconds, so it runs beside the requests, not inside one)."""
    from shared.ml.phenotype.ranking import shared_ranker

    if shared_ranker.cache_info().currsize:
        return shared_ranker()
    thread = _loading["thread"]
    if thread is None:

        def load() -> None:
            try:
                shared_ranker()
            except Exception as exc:  # noqa: BLE001 - shown on the page, logged here
                logger.exception("phenotype ranker failed to load")
                _loading["error"] = str(exc)

        thread = threading.Thread(target=load, name="phenotype-ranker", daemon=True)
        _loading["thread"] = thread
        thread.start()
    thread.join(wait)
    return shared_ranker() if shared_ranker.cache_info().currsize else None


def facial_scores(db: Session, ranking: CaseRanking | None) -> dict[str, float]:
    """``{catalogue code: mean probability}`` of the case's ranking (:mod:`shared.services.ranking`: the model and
    the photos the case page's ranking uses), by each class's OMIM or Orphanet code."""
    if ranking is None:
        return {}
    ids = [c["syndrome_id"] for c in ranking.version.classes]
    codes = {s.id: s.omim or s.orpha for s in db.scalars(select(Syndrome).where(Syndrome.id.in_(ids)))}
    return {codes[i]: float(p) for i, p in zip(ids, ranking.scores, strict=True) if codes.get(i)}


GalleryLoader = Callable[[Session, tuple], object]


def gallery_similarities(db: Session, case: Case, version_id: int | None,
                         load: GalleryLoader | None = None) -> dict[str, float]:
    """``{catalogue code: cosine similarity of the nearest diagnosed, consented gallery patient}`` for every
    syndrome in the gallery, from the case's photos under the backbone of model ``version_id`` (as the
    similar-patients list computes it; the case itself left out). Empty without that model, features or
    gallery. ``load``: how the gallery is loaded (a page's requests share one; default: from the database)."""
    from shared.modelops.gallery import case_features, gallery_space, load_gallery
    from shared.modelops.same_person import withhold_same_person

    version = db.get(ModelVersion, version_id) if version_id is not None else None
    space = gallery_space(version.config if version is not None else None)
    if not space:
        return {}
    query = case_features(db, case.id, space)
    if len(query) == 0:
        return {}
    # As the similar-patients list: other owners' patients who are this case's person do not count.
    gallery, _ = withhold_same_person(db, (load or load_gallery)(db, space), case.id, case.owner_id, version.config)
    match = gallery.match(query, exclude_case=case.id, patients=0, syndromes=len(gallery) or 1)
    out: dict[str, float] = {}
    for row in match["syndromes"]:
        code = row.get("omim") or row.get("orpha")
        if code and code not in out:  # best first: a code keeps its nearest patient
            out[code] = float(row["similarity"])
    return out


def _uses_gallery(combiner) -> bool:
    from shared.ml.phenotype.joint import GALLERY_FEATURES

    return any(combiner.weights.get(f, 0.0) for f in GALLERY_FEATURES)


def phenotype_payload(db: Session, case: Case, active_id: int | None, ranking: CaseRanking | None = None,
                      gallery: dict[str, float] | None = None, load: GalleryLoader | None = None) -> dict | None:
    """The phenotype and joint rankings of a case with HPO terms (None without terms).

    ``ranking``: the case's ranking by the face (:func:`shared.services.ranking.case_ranking`), whose model and
    photos give the joint ranking's face part. ``gallery``: ``{catalogue code: nearest gallery patient's
    similarity}``; computed here (under the backbone of that model, else the active one) when not given and the
    installed combination weighs it (the gallery read by ``load``)."""
    terms = list(case.hpo_terms or [])
    if not terms:
        return None
    loaded = ranker()
    if loaded is None:
        return {"error": _loading["error"] or "the phenotype index is still loading; reload the page in a minute"}
    try:
        scores = loaded.score(terms)
    except ValueError as exc:
        return {"error": str(exc)}
    names = loaded.names()
    order = scores.order("adjusted")[:TOP]
    phenotype = [{"rank": i + 1, "code": str(scores.codes[j]), "name": names.get(str(scores.codes[j]), ""),
                  "similarity": float(scores.similarity[j]), "p_value": float(scores.pvalue[j])}
                 for i, j in enumerate(order)]
    face = facial_scores(db, ranking)
    try:
        combiner, combiner_error = installed_combiner(), None
    except CombinerUnavailable as exc:
        combiner, combiner_error = None, str(exc)
    joint = None
    if combiner is not None:
        if gallery is None and _uses_gallery(combiner):
            gallery = gallery_similarities(db, case, ranking.version.id if ranking is not None else active_id, load)
        joint = combiner.rank(scores, face or None, gallery or None).top(TOP, names)
    return {"terms": len(terms), "ignored": scores.ignored, "mapped": scores.mapped, "phenotype": phenotype,
            "joint": joint, "facial_model": ranking.version.name if ranking is not None else None,
            "facial_photos": ranking.photos if ranking is not None else 0, "facial_classes": len(face),
            "gallery_syndromes": len(gallery or {}),
            "combiner": None if combiner is None else combiner.meta, "combiner_error": combiner_error}
